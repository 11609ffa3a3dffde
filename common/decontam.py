"""N-gram decontamination: which training texts share a word n-gram (default 13) with an evaluation set.

Convention (GPT-3 appendix C; lm-eval's ``decontamination/janitor.py``), applied to every text:

1. **Normalise**: ``str.lower()``, then delete every character that is ASCII punctuation
   (``string.punctuation``, which includes symbols such as ``$+<=>^`|~``) or a Unicode punctuation
   character (category ``P*``: curly quotes, dashes, ``¿``...). Characters are *deleted*, not replaced by
   a space, as lm-eval does: ``"don't"`` -> ``dont``, ``"well-known"`` -> ``wellknown``, ``"3.14"`` -> ``314``.
   On ASCII text this is exactly lm-eval's ``Janitor.normalize_string`` (tested).
2. **Split** on whitespace (any run of Unicode whitespace) into words.
3. **Grams**: every window of ``n`` consecutive words. Two texts overlap when they share a gram.

Texts shorter than ``n`` words (lm-eval gives them no n-grams at all, so they could never be caught):

- a text of ``m`` words, ``0 < m < n``, counts as **one gram, its whole normalised word sequence**, so a
  short training text matches a short evaluation text that is identical after normalisation;
- a short *evaluation* text with ``m >= min_short_words`` words (default 8, GPT-3's smallest n) also
  matches any training text that contains it as a contiguous ``m``-word span (all ``m``-word windows of
  the training texts are checked);
- a text with no word at all matches nothing.

Hashing: each distinct word gets a stable 64-bit hash (BLAKE2b, so indices saved to disk are valid in
any process); a gram's hash is a polynomial in those word hashes modulo 2**64, computed for all windows
of a batch of texts at once with numpy. The evaluation index is a sorted array of gram hashes with the
evaluation item each came from; lookups are ``np.searchsorted``. A false match needs a 64-bit collision
(probability ~ #train grams x #eval grams / 2**64, about 1e-7 for 1e7 x 1e6).

    index = build_eval_index({"arc_easy": arc_texts, "mmlu": mmlu_texts})
    flags, counts = contaminated(train_texts, index)           # list[bool], np.ndarray of matched windows
    summary = contamination_summary({"alpaca": alpaca_texts}, index)   # pandas, one row per pool x eval set
"""

from __future__ import annotations

import functools
import hashlib
import string
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NGRAM = 13
MIN_SHORT_WORDS = 8
_MULT = np.uint64(0x9E3779B97F4A7C15)   # odd multiplier of the polynomial gram hash
_TEXTS_PER_BATCH = 4096                 # bounds memory: one batch's word hashes at a time


@functools.cache
def _deletion_table() -> dict[int, None]:
    """str.translate table deleting ASCII and Unicode punctuation (built once, on first use)."""
    chars = set(string.punctuation)
    chars.update(chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P"))
    return dict.fromkeys(map(ord, chars))



def normalize(text: str) -> str:
    """Lower-case and delete punctuation (module docstring, step 1)."""
    return text.lower().translate(_deletion_table())


def words(text: str) -> list[str]:
    """The normalised words of a text (steps 1-2)."""
    return normalize(text).split()


@dataclass
class EvalIndex:
    """Gram hashes of an evaluation set. ``tables[m]`` = (sorted gram hashes, eval item of each) for the
    window length m: m = n for the n-grams, m < n for the whole-text grams of short evaluation texts."""

    n: int
    min_short_words: int
    set_names: list[str]
    item_set: np.ndarray             # [n_items] index into set_names
    item_ids: list[str]              # "set:position" or the ids given
    tables: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    _filters: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def prefilter(self, m: int) -> np.ndarray:
        if m not in self._filters:
            self._filters[m] = _prefilter(self.tables[m][0])
        return self._filters[m]

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def n_grams(self) -> int:
        return sum(len(h) for h, _ in self.tables.values())

    def save(self, path: str | Path) -> None:
        arrays = {f"hash_{m}": h for m, (h, _) in self.tables.items()}
        arrays.update({f"item_{m}": i for m, (_, i) in self.tables.items()})
        np.savez(path, n=self.n, min_short_words=self.min_short_words, set_names=np.array(self.set_names),
                 item_set=self.item_set, item_ids=np.array(self.item_ids), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> EvalIndex:
        with np.load(path, allow_pickle=False) as z:
            tables = {int(k[5:]): (z[k], z[f"item_{k[5:]}"]) for k in z.files if k.startswith("hash_")}
            return cls(int(z["n"]), int(z["min_short_words"]), [str(s) for s in z["set_names"]],
                       z["item_set"], [str(s) for s in z["item_ids"]], tables)


class _WordHasher:
    """Stable 64-bit hash per distinct word, memoised (per word, the Python work is one dict lookup)."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, ws: list[str]) -> np.ndarray:
        cache = self._cache
        for w in set(ws).difference(cache):
            cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
        return np.fromiter(map(cache.__getitem__, ws), np.uint64, len(ws))


def _window_hashes(word_hashes: np.ndarray, m: int) -> np.ndarray:
    """Polynomial hash of every m-word window: sum_k w[i+k] * MULT**(m-1-k) mod 2**64."""
    count = len(word_hashes) - m + 1
    if count <= 0:
        return np.empty(0, np.uint64)
    h = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(m):
            h = h * _MULT + word_hashes[k:k + count]
    return h


@dataclass
class _Batch:
    """Word hashes of a batch of texts, concatenated, with each text's word offset and length."""
    hashes: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


def _encode(texts: Sequence[str], hasher: _WordHasher) -> _Batch:
    per_text = [words(t) for t in texts]
    lengths = np.fromiter(map(len, per_text), np.int64, len(per_text))
    starts = np.zeros(len(texts), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return _Batch(hasher([w for ws in per_text for w in ws]), starts, lengths)


def _windows(batch: _Batch, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash, text) of every m-word window that lies inside one text (none crosses a text boundary)."""
    h = _window_hashes(batch.hashes, m)
    text_of_word = np.repeat(np.arange(len(batch.lengths)), batch.lengths)[: len(h)]
    inside = np.arange(len(h)) + m <= (batch.starts + batch.lengths)[text_of_word]
    return h[inside], text_of_word[inside]


def _whole(batch: _Batch, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash, text) of the texts of exactly m words, each hashed whole (the short-text rule)."""
    rows = np.flatnonzero(batch.lengths == m)
    h = np.array([_window_hashes(batch.hashes[s: s + m], m)[0] for s in batch.starts[rows]], np.uint64)
    return h, rows


def build_eval_index(eval_texts: Mapping[str, Sequence[str]] | Sequence[str], n: int = NGRAM,
                     min_short_words: int = MIN_SHORT_WORDS,
                     ids: Mapping[str, Sequence[str]] | Sequence[str] | None = None) -> EvalIndex:
    """Index the grams of one evaluation set (a list of texts) or several (``{name: texts}``).

    Items are identified as ``"name:position"`` unless ``ids`` (same shape as ``eval_texts``) gives ids.
    """
    sets = {"eval": eval_texts} if not isinstance(eval_texts, Mapping) else dict(eval_texts)
    id_sets = None if ids is None else ({"eval": ids} if not isinstance(ids, Mapping) else dict(ids))
    texts: list[str] = []
    item_set: list[int] = []
    item_ids: list[str] = []
    for s, (name, ts) in enumerate(sets.items()):
        ts = list(ts)
        given = None if id_sets is None else list(id_sets[name])
        if given is not None and len(given) != len(ts):
            raise ValueError(f"eval set '{name}': {len(ts)} texts but {len(given)} ids")
        texts.extend(ts)
        item_set.extend([s] * len(ts))
        item_ids.extend(given if given is not None else [f"{name}:{i}" for i in range(len(ts))])
    batch = _encode(texts, _WordHasher())
    # long texts contribute their n-grams; a short text, its whole word sequence (table of its length)
    tables = {n: _windows(batch, n)}
    for m in np.unique(batch.lengths[(batch.lengths > 0) & (batch.lengths < n)]).tolist():
        tables[m] = _whole(batch, m)
    for m, (hm, om) in tables.items():   # sorted by hash, one entry per distinct (gram, item)
        order = np.lexsort((om, hm))
        hm, om = hm[order], om[order]
        keep = np.ones(len(hm), bool)
        keep[1:] = (hm[1:] != hm[:-1]) | (om[1:] != om[:-1])
        tables[m] = (hm[keep], om[keep])
    return EvalIndex(n, min_short_words, list(sets), np.array(item_set, np.int64), item_ids, tables)


_FILTER_BITS = 24   # prefilter: one bool per (low 24 bits of a hash); 16 MiB, ~5 % false positives at 1M grams


def _prefilter(keys: np.ndarray) -> np.ndarray:
    table = np.zeros(1 << _FILTER_BITS, bool)
    table[keys & np.uint64((1 << _FILTER_BITS) - 1)] = True
    return table


def _lookup(hashes: np.ndarray, keys: np.ndarray, prefilter: np.ndarray) -> np.ndarray:
    """Boolean: which hashes occur in the sorted ``keys``. Most training grams are absent, so a
    one-probe bitmap rejects them before the (cache-unfriendly) binary search."""
    found = np.zeros(len(hashes), bool)
    if len(keys) == 0 or len(hashes) == 0:
        return found
    cand = np.flatnonzero(prefilter[hashes & np.uint64((1 << _FILTER_BITS) - 1)])
    pos = np.searchsorted(keys, hashes[cand]).clip(max=len(keys) - 1)
    found[cand] = keys[pos] == hashes[cand]
    return found


def _matched_windows(batch: _Batch, index: EvalIndex):
    """Yield (training text of each matched gram, its hash, table length m) for each table of the index."""
    for m, (keys, _) in index.tables.items():
        if m == index.n or m >= index.min_short_words:
            h, owner = _windows(batch, m)   # n-grams, or spans as long as a short eval text
        else:
            h, owner = _whole(batch, m)     # very short eval text: identical training texts only
        hit = _lookup(h, keys, index.prefilter(m))
        yield owner[hit], h[hit], m


def _batches(texts: Sequence[str], hasher: _WordHasher) -> Iterable[tuple[int, _Batch]]:
    for lo in range(0, len(texts), _TEXTS_PER_BATCH):
        yield lo, _encode(texts[lo: lo + _TEXTS_PER_BATCH], hasher)


def match_counts(train_texts: Sequence[str], index: EvalIndex) -> np.ndarray:
    """Per training text: how many of its grams (windows, with repetition) occur in the eval index."""
    texts = list(train_texts)
    counts = np.zeros(len(texts), np.int64)
    hasher = _WordHasher()
    for lo, batch in _batches(texts, hasher):
        for owner, _, _ in _matched_windows(batch, index):
            counts[lo: lo + len(batch.lengths)] += np.bincount(owner, minlength=len(batch.lengths))
    return counts


def contaminated(train_texts: Sequence[str], index: EvalIndex) -> tuple[list[bool], np.ndarray]:
    """(flag per training text: shares a gram with the eval set, matched gram count per text)."""
    counts = match_counts(train_texts, index)
    return (counts > 0).tolist(), counts


def eval_items_hit(train_texts: Sequence[str], index: EvalIndex) -> list[list[int]]:
    """Per training text: the sorted positions (into ``index.item_ids``) of the eval items it overlaps."""
    texts = list(train_texts)
    hits: list[set[int]] = [set() for _ in texts]
    hasher = _WordHasher()
    for lo, batch in _batches(texts, hasher):
        for owner, h, m in _matched_windows(batch, index):
            keys, items = index.tables[m]
            left, right = np.searchsorted(keys, h, "left"), np.searchsorted(keys, h, "right")
            for o, a, b in zip(owner.tolist(), left.tolist(), right.tolist()):
                hits[lo + o].update(items[a:b].tolist())
    return [sorted(s) for s in hits]


def contamination_summary(pools: Mapping[str, Sequence[str]], index: EvalIndex):
    """pandas DataFrame, one row per (pool, eval set) plus (pool, "all"): n_train, n_contaminated,
    frac_contaminated (training examples overlapping that eval set), n_eval_hit, frac_eval_hit
    (eval items overlapped by any example of the pool)."""
    import pandas as pd

    rows = []
    set_sizes = np.bincount(index.item_set, minlength=len(index.set_names))
    for pool, texts in pools.items():
        hits = eval_items_hit(texts, index)
        for s, name in [*enumerate(index.set_names), (-1, "all")]:
            per_text = [[i for i in h if s < 0 or index.item_set[i] == s] for h in hits]
            n_cont = sum(1 for h in per_text if h)
            hit_items = {i for h in per_text for i in h}
            n_eval = len(index) if s < 0 else int(set_sizes[s])
            rows.append({"pool": pool, "eval_set": name, "n_train": len(per_text), "n_contaminated": n_cont,
                         "frac_contaminated": n_cont / max(len(per_text), 1), "n_eval": n_eval,
                         "n_eval_hit": len(hit_items), "frac_eval_hit": len(hit_items) / max(n_eval, 1)})
    return pd.DataFrame(rows)

"""Per-document information-density, lexical-diversity and readability metrics (English and French).

Definitions follow ../shared/research/curriculum.md §1. Reference packages and what we reproduce:
- MTLD: the lexicalrichness 0.5.1 variant (factor closes when TTR <= 0.72, no minimum factor length,
  partial factor (1 - TTR)/(1 - 0.72), MTLD = N / factors, mean of forward and backward, all-unique text
  -> N). lexical-diversity 0.1.1 closes a factor only when TTR < 0.72 *and* the factor has >= 10 tokens,
  divides summed factor lengths by summed factors, and returns 0.0 when every token is unique; taaled's
  default `mtld` averages factor lengths instead. Values therefore differ by a few percent (see tests).
- HD-D: sum over types of P(type drawn at least once in 42 draws without replacement) / 42 (all three
  packages agree); computed exactly in log space, vectorised over types.
- vocd-D: lexicalrichness draws 100 random samples for each size 35..50 and fits
  TTR(N) = D/N [sqrt(1 + 2N/D) - 1]. The mean TTR of random samples of size N estimates the *expected*
  sample TTR, which is exactly sum_t P(t in sample)/N (the HD-D expression at n = N). We fit D to that
  expectation: the same estimand without sampling noise, deterministic and ~1000x cheaper.
- Readability: Flesch Reading Ease and Flesch-Kincaid grade with textstat's constants (fr: 207, 1.015,
  73.6); syllables = pyphen hyphenation points + 1 (textstat <= 0.7.4 rule; offline dictionaries).
  `readability_textstat(...)` reproduces textstat 0.7.4 exactly (rounding off); `readability(...)` is our
  default, with a sentence splitter that copes with text lacking .!? and French elision handling.
"""

from __future__ import annotations

import lzma
import math
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.special import gammaln

try:
    import numba
except ImportError:  # optional: every kernel below also runs as plain Python (same values, slower)
    numba = None

LN2 = math.log(2.0)
USE_NUMBA = numba is not None and os.environ.get("LLM4ALL_NO_NUMBA", "0") != "1"


def njit(fn: Callable) -> Callable:
    """Compile `fn` with numba (on-disk cache, so only the first process pays the ~1 s compile) when it is
    installed; otherwise return it unchanged. Either way `fn.py_func` is the plain-Python version, which the
    tests run against the compiled one."""
    if USE_NUMBA:
        return numba.njit(cache=True, nogil=True)(fn)
    fn.py_func = fn
    return fn

# ---------------------------------------------------------------- tokenisation

_ELISION_FR = re.compile(r"\b(jusqu|lorsqu|puisqu|quoiqu|presqu|qu|[cdjlmnst])'(?=[^\W\d_])", re.I)
_WORD = re.compile(r"[^\W\d_]+(?:[-'][^\W\d_]+)*'?")


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with lone UTF-16 surrogates (which `json.loads('"\\ud83d"')` happily returns, and which cannot be
    encoded as UTF-8) replaced by U+FFFD, after joining any valid high/low pair into its character; other
    strings are returned unchanged. Every metric of `document_metrics` sees the cleaned text."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def normalise_apostrophes(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u02bc", "'")


def tokenize(text: str, lang: str = "en") -> list[str]:
    """Lower-cased word tokens (letters only; digits dropped like lexicalrichness). Hyphenated words stay
    one token. French elisions are split: "l'homme" -> ["l'", "homme"], "qu'elle" -> ["qu'", "elle"]."""
    text = normalise_apostrophes(text.lower())
    if lang == "fr":
        text = _ELISION_FR.sub(r"\1' ", text)
    return _WORD.findall(text)


# ---------------------------------------------------------------- entropy

def entropy_from_counts(counts: np.ndarray) -> tuple[float, float]:
    """(plug-in, Miller-Madow) Shannon entropy in bits of a histogram. MM adds (K - 1) / (2N) nats."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    n = counts.sum()
    if n == 0:
        return 0.0, 0.0
    p = counts / n
    h = float(-(p * np.log2(p)).sum())
    return h, h + (len(counts) - 1) / (2.0 * n) / LN2


def char_ngram_counts(text: str, n: int) -> np.ndarray:
    """Counts of the character n-grams of ``text`` (n <= 3: code points fit 21 bits, 3 of them 63 bits)."""
    if not 1 <= n <= 3:
        raise ValueError(f"character n-gram order must be 1..3, got {n}")
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    if len(cp) < n:
        return np.zeros(0)
    key = cp[: len(cp) - n + 1].copy()
    for k in range(1, n):
        key |= cp[k: len(cp) - n + 1 + k] << np.uint64(21 * k)
    return np.unique(key, return_counts=True)[1]


def token_ngram_counts(ids: np.ndarray, n: int) -> np.ndarray:
    if len(ids) < n:
        return np.zeros(0)
    rows = np.stack([ids[k: len(ids) - n + 1 + k] for k in range(n)], axis=1)
    return np.unique(rows, axis=0, return_counts=True)[1]


def entropy_metrics(text: str, ids: np.ndarray, max_char_n: int = 3) -> dict[str, float]:
    """Character n-gram entropies (bits/char) and word unigram/bigram entropies (bits/token and bits/char)."""
    out: dict[str, float] = {}
    n_chars = max(len(text), 1)
    prev = 0.0
    for n in range(1, max_char_n + 1):
        h, mm = entropy_from_counts(char_ngram_counts(text, n))
        out[f"char{n}_bits_per_char"] = h / n          # block entropy per character
        out[f"char{n}_mm_bits_per_char"] = mm / n
        out[f"char{n}_cond_bits"] = h - prev           # conditional entropy h_n = H_n - H_{n-1}
        prev = h
    h1, mm1 = entropy_from_counts(np.bincount(ids) if len(ids) else np.zeros(0))
    out["word1_bits_per_token"], out["word1_mm_bits_per_token"] = h1, mm1
    out["word1_bits_per_char"] = h1 * len(ids) / n_chars
    h2, mm2 = entropy_from_counts(token_ngram_counts(ids, 2))
    out["word2_bits_per_token"], out["word2_mm_bits_per_token"] = h2 / 2, mm2 / 2
    return out


# ---------------------------------------------------------------- compression

def _zstd():
    import zstandard
    # no frame checksum / content size / dict id: the container overhead is what biases short documents
    return zstandard.ZstdCompressor(level=19, write_checksum=False, write_content_size=False,
                                    write_dict_id=False)


_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20}]


def compressed_sizes(data: bytes, zstd=None) -> dict[str, int]:
    """Compressed sizes with raw deflate (no zlib/gzip header), zstd (minimal frame) and raw LZMA2."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflate = len(c.compress(data) + c.flush())
    zs = len((zstd or _zstd()).compress(data))
    xz = len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))
    return {"deflate": deflate, "zstd": zs, "lzma": xz}


@lru_cache(maxsize=1)
def empty_overhead() -> dict[str, int]:
    """Bytes each compressor writes for empty input (subtracted in the *_net ratios)."""
    return compressed_sizes(b"")


def compression_metrics(text: str, zstd=None) -> dict[str, float]:
    data = text.encode("utf-8")
    n = max(len(data), 1)
    out: dict[str, float] = {}
    over = empty_overhead()
    for name, size in compressed_sizes(data, zstd).items():
        out[f"{name}_ratio"] = n / size                       # original / compressed (higher = redundant)
        out[f"{name}_bits_per_byte"] = 8.0 * size / n
        out[f"{name}_ratio_net"] = n / max(size - over[name], 1)
    return out


def length_bucket_normalise(values: np.ndarray, n_bytes: np.ndarray, n_buckets: int = 8) -> np.ndarray:
    """values / median(values of documents in the same length bucket); buckets = quantiles of log length.

    Short documents compress worse whatever their content (container overhead, empty dictionary), so a
    ratio is only comparable with documents of similar length."""
    values, n_bytes = np.asarray(values, float), np.asarray(n_bytes, float)
    if len(values) == 0:
        return values
    edges = np.unique(np.quantile(np.log(n_bytes), np.linspace(0, 1, n_buckets + 1)[1:-1]))
    bucket = np.searchsorted(edges, np.log(n_bytes), side="right")
    out = np.empty_like(values)
    for b in np.unique(bucket):
        m = bucket == b
        out[m] = values[m] / np.median(values[m])
    return out


# ---------------------------------------------------------------- lexical diversity

@njit
def _mtld_kernel(ids: np.ndarray, lo: int, n_types: int, threshold: float, backward: bool) -> float:
    """lexicalrichness 0.5.1 sub_mtld over integer ids (type = id - lo): the running TTR of the current
    factor is types/tokens; a factor closes when it is <= threshold. `stamp[t]` holds the factor in which
    type t was last seen, so resetting a factor is O(1) instead of clearing a set."""
    n = len(ids)
    stamp = np.full(n_types, -1, np.int64)
    factors, seg, count, types, ttr = 0.0, 0, 0, 0, 1.0
    for k in range(n):
        t = ids[n - 1 - k] - lo if backward else ids[k] - lo
        count += 1
        if stamp[t] != seg:
            stamp[t] = seg
            types += 1
        ttr = types / count
        if ttr <= threshold:
            factors += 1.0
            seg += 1
            count, types = 0, 0
    if count > 0:  # partial factor
        factors += (1.0 - ttr) / (1.0 - threshold)
    if factors == 0.0:  # only when every token is unique: lexicalrichness then counts one factor (MTLD = N)
        factors = 1.0
    return n / factors


@njit
def _mtld_both(ids: np.ndarray, threshold: float) -> float:
    """Mean of forward and backward MTLD; -1 when the ids are too sparse for a `stamp` array."""
    lo, hi = ids.min(), ids.max()
    if hi - lo > 8 * len(ids) + 1024:
        return -1.0
    n_types = hi - lo + 1
    return 0.5 * (_mtld_kernel(ids, lo, n_types, threshold, False) + _mtld_kernel(ids, lo, n_types, threshold, True))


def mtld(ids: np.ndarray, threshold: float = 0.72) -> float:
    """Bidirectional MTLD (mean of forward and backward), lexicalrichness 0.5.1 variant."""
    ids = np.asarray(ids)
    if len(ids) == 0:
        return float("nan")
    if ids.dtype != np.int64:
        ids = ids.astype(np.int64)
    out = _mtld_both(ids, threshold)
    if out < 0:  # sparse ids (e.g. hashes): compact them first
        out = _mtld_both(np.unique(ids, return_inverse=True)[1].ravel().astype(np.int64), threshold)
    return out


def _p_seen(freqs: np.ndarray, n_tokens: int, draws: np.ndarray) -> np.ndarray:
    """P(type with frequency f appears in a sample of `draws` tokens without replacement), shape
    (len(draws), len(freqs)): 1 - C(N - f, d) / C(N, d), in log space."""
    f = freqs[None, :].astype(np.float64)
    d = np.asarray(draws, dtype=np.float64)[:, None]
    N = float(n_tokens)
    ok = (N - f) >= d
    log_p0 = np.where(ok, gammaln(N - f + 1) - gammaln(np.maximum(N - f - d, 0) + 1)
                      - gammaln(N + 1) + gammaln(N - d + 1), -np.inf)
    return 1.0 - np.exp(log_p0)


def hdd(ids: np.ndarray, draws: int = 42) -> float:
    """HD-D on the TTR-like scale (divided by `draws`); NaN when the text has fewer tokens than `draws`."""
    ids = np.asarray(ids)
    if len(ids) < draws:
        return float("nan")
    freqs = np.unique(ids, return_counts=True)[1]
    return float(_p_seen(freqs, len(ids), np.array([draws])).sum() / draws)


def _log_p_absent(freqs: np.ndarray, n_tokens: int, max_draws: int) -> np.ndarray:
    """log P(type with frequency f is absent from a sample of d tokens drawn without replacement), for every
    d = 1..max_draws, shape (len(freqs), max_draws): the running sum over k < d of log1p(-f / (N - k)).

    Accurate when the probability is close to 1 (rare types in a long text), where the gammaln difference of
    `_p_seen` loses ~1e-13 * N and would let an all-unique text look slightly repetitive."""
    f = np.asarray(freqs, dtype=np.float64)[:, None]
    ratio = f / (float(n_tokens) - np.arange(max_draws, dtype=np.float64))[None, :]
    with np.errstate(divide="ignore"):
        terms = np.where(ratio < 1.0, np.log1p(-np.minimum(ratio, 1.0)), -np.inf)
    return np.cumsum(terms, axis=1)


def _ttr_nd(n: np.ndarray, d: float) -> np.ndarray:
    """vocd's model TTR(N) = D/N [sqrt(1 + 2N/D) - 1], written as 2 / (1 + sqrt(1 + 2N/D)) (no cancellation
    when D >> N)."""
    return 2.0 / (1.0 + np.sqrt(1.0 + 2.0 * n / d))


def _deficit_nd(n: np.ndarray, d: float) -> np.ndarray:
    """1 - TTR(N) of the vocd model, computed without cancellation: (2N/D) / (1 + sqrt(1 + 2N/D))^2."""
    x = 2.0 * n / d
    return x / (1.0 + np.sqrt(1.0 + x)) ** 2


def vocd(ids: np.ndarray, min_n: int = 35, max_n: int = 50) -> float:
    """vocd-D fitted (least squares in D, like curve_fit) to the *expected* TTR of samples of 35..50 tokens.

    Defined results: NaN below `max_n` tokens (no sample of that size); +inf when every token is a distinct
    type (every sample is all-unique, TTR = 1, which the model reaches only as D -> inf), at every length;
    a finite D otherwise, however large. The fit runs on 1 - TTR (no cancellation near TTR = 1), in log D,
    with the residuals scaled by their typical size: the same least-squares minimiser, reached reliably
    when D is in the millions."""
    from scipy.optimize import least_squares

    ids = np.asarray(ids)
    if len(ids) < max_n:
        return float("nan")
    freqs = np.unique(ids, return_counts=True)[1]
    if freqs.max() == 1:
        return float("inf")
    ns = np.arange(min_n, max_n + 1, dtype=np.float64)
    p_seen = -np.expm1(_log_p_absent(freqs, len(ids), max_n)[:, min_n - 1:])     # (types, sizes)
    deficit = (ns - p_seen.sum(axis=0)) / ns        # 1 - expected TTR, > 0 once a type repeats
    deficit = np.maximum(deficit, np.finfo(float).tiny)
    # start from the model inverted at the mean size: TTR = 2/(1+s), s^2 = 1 + 2N/D
    t, n0 = 1.0 - deficit.mean(), ns.mean()
    d0 = 2.0 * n0 / max((2.0 / t - 1.0) ** 2 - 1.0, 1e-300)
    scale = 1.0 / deficit.mean()   # a common factor: same minimiser, residuals of order 1
    lo, hi = math.log(1e-6), math.log(1e300)
    fit = least_squares(lambda x: scale * (deficit - _deficit_nd(ns, math.exp(x[0]))),
                        x0=[min(max(math.log(d0), lo + 1), hi - 1)], bounds=([lo], [hi]))
    return float(math.exp(fit.x[0]))


def lexical_metrics(ids: np.ndarray, mtld_threshold: float = 0.72, hdd_draws: int = 42) -> dict[str, float]:
    n = len(ids)
    types = len(np.unique(ids)) if n else 0
    return {"n_tokens": float(n), "n_types": float(types),
            "ttr": types / n if n else float("nan"), "root_ttr": types / math.sqrt(n) if n else float("nan"),
            "mtld": mtld(ids, mtld_threshold), "hdd": hdd(ids, hdd_draws), "vocd": vocd(ids)}


# ---------------------------------------------------------------- readability

@dataclass(frozen=True)
class FleschConstants:
    base: float
    asl: float
    asw: float


FRE_CONSTANTS = {"en": FleschConstants(206.835, 1.015, 84.6), "fr": FleschConstants(207.0, 1.015, 73.6)}
PYPHEN_LANG = {"en": "en_US", "fr": "fr_FR"}
_ABBREV = {"en": {"mr", "mrs", "ms", "dr", "st", "prof", "vs", "etc", "e.g", "i.e", "jr", "sr", "no", "fig"},
           "fr": {"m", "mm", "mme", "mmes", "mlle", "mlles", "dr", "st", "ste", "etc", "p", "cf", "fig"}}


@lru_cache(maxsize=4)
def _pyphen(lang: str):
    import pyphen

    if lang not in PYPHEN_LANG:
        raise ValueError(f"no hyphenation dictionary configured for language '{lang}' (known: en, fr)")
    return pyphen.Pyphen(lang=PYPHEN_LANG[lang])


@lru_cache(maxsize=200_000)
def syllables(word: str, lang: str = "en") -> int:
    """Hyphenation points + 1 (pyphen, offline dictionaries); hyphenated compounds sum their parts."""
    dic = _pyphen(lang)
    return sum(len(dic.positions(part)) + 1 for part in word.split("-") if part)


class _SyllableCache(dict):
    """word -> `count(word)`, filled on first sight. `sum(map(cache.__getitem__, words))` then runs in C:
    one dict hit per word instead of a Python call through lru_cache."""

    def __init__(self, count: Callable[[str], int]):
        super().__init__()
        self.count = count

    def __missing__(self, word: str) -> int:
        self[word] = n = self.count(word)
        return n


@lru_cache(maxsize=8)
def _word_syllables(lang: str) -> _SyllableCache:
    _pyphen(lang)  # fail early on an unknown language
    return _SyllableCache(lambda w: syllables(w, lang))


_BOUNDARY = re.compile(r"[.!?\u2026]+[\"'\u201d\u00bb)\]]*(?=\s)")


def _trailing_word(text: str, start: int, end: int, longest: int = 8) -> str:
    """The run of \\w and "." characters that ends at text[end] (what `[\\w.]+$` matches), or "" when it is
    longer than `longest` (no abbreviation is): a backwards scan of at most `longest` + 1 characters, where
    the regex search was quadratic in the length of a long unbroken token."""
    i = end
    while i > start and end - i <= longest and (text[i - 1] == "." or text[i - 1] == "_" or text[i - 1].isalnum()):
        i -= 1
    return "" if end - i > longest else text[i:end]


def split_sentences(text: str, lang: str = "en", max_words: int = 60) -> list[str]:
    """Sentences: split paragraphs (blank lines) at .!?… followed by space (skipping known abbreviations and
    initials); a multi-line paragraph without any terminal punctuation (verse, lists, headings) is split at
    line breaks; a sentence still longer than `max_words` is cut at ; or : and then into `max_words` pieces,
    so text without punctuation cannot produce one 2,000-word "sentence"."""
    abbrev = _ABBREV.get(lang, set())
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if not re.search(r"[.!?\u2026]", para):
            pieces = [ln for ln in para.splitlines() if ln.strip()]
        else:
            pieces, start = [], 0
            for m in _BOUNDARY.finditer(para):
                w = _trailing_word(para, start, m.start()).lower()
                if m.group().startswith(".") and (w in abbrev or (len(w) == 1 and w.isalpha())):
                    continue
                pieces.append(para[start:m.end()])
                start = m.end()
            pieces.append(para[start:])
        for piece in pieces:
            if len(_WORD.findall(piece)) > max_words:
                for clause in re.split(r"(?<=[;:])\s+", piece):
                    words = clause.split()
                    out.extend(" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words))
            elif piece.strip():
                out.append(piece.strip())
    return [s for s in out if _WORD.search(s)]


def readability(text: str, lang: str = "en", max_sentence_words: int = 60) -> dict[str, float]:
    """FRE (language constants) and FKGL. Words are the tokens of `tokenize`, except that a French elided
    clitic ("l'", "qu'") is part of its host word: "l'homme" is one word with the syllables of "homme".

    Text without any word (empty, whitespace, punctuation, digits, emoji only) gives NaN for asl/asw/fre/fkgl:
    readability is undefined there. textstat instead returns its intercepts (FRE 206.835, FKGL -15.59:
    "easiest possible text"); `readability_textstat` reproduces that."""
    sents = split_sentences(text, lang, max_sentence_words)
    words = [w for w in tokenize(text, lang) if not w.endswith("'")]
    if not sents or not words:
        return {"n_sentences": float(len(sents)), "asl": float("nan"), "asw": float("nan"),
                "fre": float("nan"), "fkgl": float("nan")}
    asl = len(words) / len(sents)
    asw = sum(map(_word_syllables(lang).__getitem__, words)) / len(words)
    c = FRE_CONSTANTS[lang]
    return {"n_sentences": float(len(sents)), "asl": asl, "asw": asw,
            "fre": c.base - c.asl * asl - c.asw * asw, "fkgl": 0.39 * asl + 11.8 * asw - 15.59}


def _ts_remove_punct(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text)  # textstat 0.7.4 default (rm_apostrophe=True): all punctuation


@lru_cache(maxsize=200_000)
def _ts_syllables(word: str, lang: str) -> int:
    return len(_pyphen(lang).positions(word)) + 1


def _ts_token_count(token: str, lang: str) -> int:
    word = _ts_remove_punct(token)
    return _ts_syllables(word, lang) if word else 0


@lru_cache(maxsize=8)
def _ts_token_syllables(lang: str) -> _SyllableCache:
    """Lower-cased whitespace token -> textstat syllables of what is left once its punctuation is deleted
    (0 when nothing is left): a document costs one dict hit per token, pyphen only sees new tokens."""
    _pyphen(lang)
    return _SyllableCache(lambda tok: _ts_token_count(tok, lang))


def clear_syllable_caches() -> None:
    """Forget every cached syllable count (pyphen keeps its own per-word cache)."""
    for cache in (_ts_token_syllables, _word_syllables, _ts_syllables, syllables):
        cache.cache_clear()


CHAR_WORD, CHAR_SPACE, CHAR_STOP = 1, 2, 4


@lru_cache(maxsize=1)
def char_classes() -> np.ndarray:
    """Bit flags for every code point, taken from `re` itself: \\w, \\s (= str.isspace, what str.split uses)
    and textstat's sentence terminators .!? (1.1 MB, built once in ~0.2 s)."""
    every = "".join(map(chr, range(0x110000)))
    table = np.zeros(0x110000, dtype=np.uint8)
    for pattern, bit in ((r"\w", CHAR_WORD), (r"\s", CHAR_SPACE), (r"[.!?]", CHAR_STOP)):
        table[[m.start() for m in re.finditer(pattern, every)]] |= bit
    return table


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


@njit
def _ts_word_sentence_counts(cp: np.ndarray, classes: np.ndarray) -> tuple[int, int]:
    """(words, sentences of >= 3 words) by textstat 0.7.4's rules, in one pass over the code points.

    Words: whitespace-separated tokens that keep a \\w character once punctuation is deleted. Sentences: the
    regex \\b[^.!?]+[.!?]* matches each maximal run of non-terminators holding a \\w character (from its
    first one on); the run's words are its pieces between whitespace that hold a \\w character."""
    words, long_sents = 0, 0
    tok_word = False     # the current whitespace token holds a \w
    piece_word = False   # the current piece (cut at whitespace and at terminators) holds a \w
    sent_words = 0       # word pieces seen so far in the current run of non-terminators
    for k in range(len(cp)):
        c = classes[cp[k]]
        if c & (CHAR_SPACE | CHAR_STOP):
            sent_words += piece_word
            piece_word = False
            if c & CHAR_SPACE:
                words += tok_word
                tok_word = False
            else:
                long_sents += sent_words >= 3
                sent_words = 0
        elif c & CHAR_WORD:
            tok_word = piece_word = True
    words += tok_word
    sent_words += piece_word
    long_sents += sent_words >= 3
    return words, long_sents


def readability_textstat(text: str, lang: str = "en") -> dict[str, float]:
    """textstat 0.7.4's FRE/FKGL rules reproduced (with `textstat.set_rounding(False)`), for checking.

    Sentences = regex ``\\b[^.!?]+[.!?]*`` minus those of <= 2 words, floored at 1; words = whitespace split
    after deleting punctuation (hyphens and elision apostrophes too: "l'homme" -> "lhomme"). Words and
    sentences are counted in one compiled pass over the code points, syllables through a per-token cache.
    Without any word textstat's averages are 0 (its ZeroDivisionError fallback), so FRE and FKGL are the
    intercepts (206.835 / 207 and -15.59); reproduced here."""
    n_words, n_long = _ts_word_sentence_counts(codepoints(text), char_classes())
    if not n_words:
        return {"fre": FRE_CONSTANTS[lang].base, "fkgl": -15.59}
    syl = sum(map(_ts_token_syllables(lang).__getitem__, text.lower().split()))
    asl, asw = n_words / max(1, n_long), syl / n_words
    c = FRE_CONSTANTS[lang]
    return {"fre": c.base - c.asl * asl - c.asw * asw, "fkgl": 0.39 * asl + 11.8 * asw - 15.59}


# ---------------------------------------------------------------- per-document and batch API

def document_metrics(text: str, lang: str, zstd=None) -> dict[str, float]:
    """All cheap (model-free) metrics of one document. Any string is accepted (lone surrogates are replaced
    first, see `clean_text`); the same keys always come back, NaN where a metric is undefined (no tokens:
    ttr, mtld; fewer than 42 / 50 tokens: hdd / vocd; no word: readability), +inf for vocd of all-unique
    text (see `vocd`)."""
    text = clean_text(text)
    toks = tokenize(text, lang)
    ids = np.unique(toks, return_inverse=True)[1].astype(np.int64) if toks else np.zeros(0, np.int64)
    out = {"n_bytes": float(len(text.encode("utf-8")))}
    out.update(entropy_metrics(text, ids))
    out.update(compression_metrics(text, zstd))
    out.update(lexical_metrics(ids))
    out.update(readability(text, lang))
    return out


def score_batch(batch: dict[str, list], text_col: str = "text", lang_col: str = "language") -> dict[str, list]:
    """`datasets.map(batched=True)` function: one column per metric."""
    zstd = _zstd()
    rows = [document_metrics(t, lg, zstd) for t, lg in zip(batch[text_col], batch[lang_col])]
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def score_dataset(ds: Any, num_proc: int = 1, batch_size: int = 64, n_buckets: int = 8):
    """Add every metric column to a Dataset (uses `num_proc` worker processes) plus length-bucket
    normalised compression ratios (`*_ratio_lennorm`, computed per language)."""
    scored = ds.map(score_batch, batched=True, batch_size=batch_size, num_proc=num_proc if num_proc > 1 else None,
                    desc="metrics")
    lang = np.asarray(scored["language"])
    nb = np.asarray(scored["n_bytes"], float)
    for name in ("deflate", "zstd", "lzma"):
        vals = np.asarray(scored[f"{name}_ratio"], float)
        norm = np.empty_like(vals)
        for lg in np.unique(lang):
            m = lang == lg
            norm[m] = length_bucket_normalise(vals[m], nb[m], n_buckets)
        scored = scored.add_column(f"{name}_ratio_lennorm", norm.tolist())
    return scored


# ---------------------------------------------------------------- model-based density

def perplexity(model: Any, tokenizer: Any, texts: list[str], max_length: int = 256, batch_size: int = 8,
               ) -> list[dict[str, float]]:
    """Mean token NLL (nats), perplexity and bits per UTF-8 byte of each text's first `max_length` tokens
    under a causal LM. A BOS/EOS token is prepended when the tokenizer has one so the first token is scored."""
    import torch

    model.eval()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - (prefix is not None)]
               for t in chunk]
        seqs = [([prefix] if prefix is not None else []) + e for e in enc]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        nll = (nll * mask[:, 1:]).sum(1)
        for j, e in enumerate(enc):
            n_tok = max(len(seqs[j]) - 1, 1)
            n_bytes = max(len(tokenizer.decode(e).encode("utf-8")), 1)
            total = float(nll[j])
            out.append({"nll": total / n_tok, "ppl": math.exp(total / n_tok),
                        "lm_bits_per_byte": total / LN2 / n_bytes})
    return out

"""common.decontam: planted overlaps are found, near-misses are not, and random texts agree with a
brute-force set-of-tuples oracle and with lm-eval's own Janitor n-grams."""

from __future__ import annotations

import contextlib
import io
import random
import string

import numpy as np
import pytest

from common import decontam
from common.decontam import build_eval_index, contaminated, contamination_summary, eval_items_hit, match_counts

EVAL = [
    "Which of the following best explains why the Moon appears to change shape over the course of a month "
    "as seen from Earth? A: shadow B: orbit C: clouds D: tides",
    "A student mixes baking soda and vinegar in a cup and observes bubbles forming quickly; which property of "
    "matter does this demonstrate most clearly to the class?",
    "Photosynthesis converts light energy into chemical energy.",            # 7 words: < min_short_words
    "What gas do plants take in from the air to make food?",               # 12 words: short, >= 8
]
FILLER = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
          "dolore magna aliqua").split()


def _filler(k: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(FILLER) for _ in range(k))


@pytest.fixture(scope="module")
def index():
    return build_eval_index({"arc": EVAL[:2], "other": EVAL[2:]})


def test_normalisation_matches_lm_eval_janitor_on_ascii():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from lm_eval.decontamination.janitor import Janitor  # warns that its C++ module is missing
        janitor = Janitor()
    rng = random.Random(1)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n"
    for _ in range(200):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert decontam.normalize(s) == janitor.normalize_string(s)
    # Unicode: full lower-casing and Unicode punctuation deleted too (documented superset)
    assert decontam.words("“Ünïcode” — Test… ¿sí?") == ["ünïcode", "test", "sí"]
    assert decontam.words("Don't   STOP\tnow!") == ["dont", "stop", "now"]


def test_exact_copy_and_case_punctuation_whitespace_variants(index):
    variant = ("  WHICH of the following, best explains why the moon APPEARS to change shape over the course... "
               "of a month\n\tas seen from EARTH!!  a shadow b orbit c clouds d tides")
    flags, counts = contaminated([EVAL[0], variant, EVAL[1].upper()], index)
    assert flags == [True, True, True]
    n_grams_0 = len(decontam.words(EVAL[0])) - 13 + 1
    assert counts[0] == n_grams_0 and counts[1] == n_grams_0   # every 13-gram of the copy matches
    assert eval_items_hit([EVAL[0], variant, EVAL[1]], index) == [[0], [0], [1]]
    assert index.item_ids[:2] == ["arc:0", "arc:1"]


def test_embedded_13_gram_is_found_and_12_shared_words_are_not(index):
    w = decontam.words(EVAL[1])
    assert len(w) == 27
    span13, span12 = " ".join(w[5:18]), " ".join(w[5:17])
    texts = [f"{_filler(40, 1)} {span13} {_filler(40, 2)}",
             f"{_filler(40, 3)} {span12} {_filler(40, 4)}",
             f"{_filler(40, 5)} {' '.join(w[:12])} zzz {' '.join(w[14:27])} {_filler(3)}"]  # 12 + gap + 13
    flags, counts = contaminated(texts, index)
    assert flags == [True, False, True]
    assert counts.tolist() == [1, 0, 1]
    assert eval_items_hit(texts, index) == [[1], [], [1]]


def test_short_text_rules(index):
    short_ok, very_short = EVAL[3], EVAL[2]   # 12 words (>= 8), 7 words (< 8)
    texts = [short_ok.lower(),                                  # identical short text
             f"{_filler(20)} {short_ok} {_filler(20, 9)}",       # short eval text embedded: spans are searched
             very_short.upper() + "!!",                          # identical very short text
             f"Recall: {very_short} {_filler(10)}",               # very short eval embedded: not searched
             " ".join(decontam.words(short_ok)[:-1]),            # 11 of its 12 words
             "", "!!! ...",                                       # no words at all
             ]
    flags, _ = contaminated(texts, index)
    assert flags == [True, True, True, False, False, False, False]
    assert eval_items_hit(texts[:3], index) == [[3], [3], [2]]
    # a short training text never matches a long eval text it is part of
    assert contaminated([" ".join(decontam.words(EVAL[0])[:12])], index)[0] == [False]


def _oracle(train: list[list[str]], evals: list[list[str]], n: int, min_short: int):
    """Brute force with Python sets of word tuples, straight from the documented rule."""
    def windows(ws, m):
        return [tuple(ws[i:i + m]) for i in range(len(ws) - m + 1)]

    tables: dict[int, dict[tuple, set[int]]] = {}
    for j, e in enumerate(evals):
        grams = windows(e, n) if len(e) >= n else ([tuple(e)] if e else [])
        for g in grams:
            tables.setdefault(len(g), {}).setdefault(g, set()).add(j)
    counts, hits = [], []
    for t in train:
        c, h = 0, set()
        for m, table in tables.items():
            cand = windows(t, m) if (m == n or m >= min_short) else ([tuple(t)] if len(t) == m else [])
            for g in cand:
                if g in table:
                    c += 1
                    h |= table[g]
        counts.append(c)
        hits.append(sorted(h))
    return counts, hits


def _noisy(ws: list[str], rng: random.Random) -> str:
    """Same words, random case / punctuation / whitespace."""
    out = []
    for w in ws:
        w = "".join(ch.upper() if rng.random() < 0.3 else ch for ch in w)
        if rng.random() < 0.3:
            w = rng.choice(",.;:!?\"'()-") + w
        out.append(w)
    return "".join(x + rng.choice([" ", "  ", "\t", "\n"]) for x in out)


@pytest.mark.parametrize("n,min_short", [(4, 3), (13, 8)])
def test_random_texts_agree_with_brute_force_and_lm_eval(n, min_short):
    rng = random.Random(n)
    vocab = [f"w{i}" for i in range(3 if n == 4 else 2)]     # tiny vocabulary: overlaps are common
    def sample(lo, hi):
        return [rng.choice(vocab) for _ in range(rng.randint(lo, hi))]
    evals = [sample(0, 3 * n) for _ in range(40)]
    train = [sample(0, 4 * n) for _ in range(300)]
    eval_texts = [_noisy(e, rng) for e in evals]
    train_texts = [_noisy(t, rng) for t in train]
    index = build_eval_index(eval_texts, n=n, min_short_words=min_short)
    want_counts, want_hits = _oracle(train, evals, n, min_short)
    assert match_counts(train_texts, index).tolist() == want_counts
    assert eval_items_hit(train_texts, index) == want_hits
    flags, _ = contaminated(train_texts, index)
    assert 0 < sum(flags) < len(flags)   # the test has both outcomes
    # lm-eval's Janitor n-grams give the same flags wherever both texts have >= n words
    from lm_eval.decontamination.janitor import word_ngrams
    long_eval = [e for e in eval_texts if len(decontam.words(e)) >= n]
    dirt = {g for e in long_eval for g in word_ngrams(decontam.normalize(e), n)}
    long_index = build_eval_index(long_eval, n=n, min_short_words=min_short)
    got = contaminated(train_texts, long_index)[0]
    want = [any(g in dirt for g in word_ngrams(decontam.normalize(t), n)) for t in train_texts]
    assert got == want


def test_batches_and_save_load_roundtrip(tmp_path, monkeypatch):
    rng = random.Random(3)
    vocab = [f"v{i}" for i in range(4)]
    evals = [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 30))) for _ in range(30)]
    train = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    index = build_eval_index(evals, n=6, min_short_words=4)
    whole = match_counts(train, index)
    monkeypatch.setattr(decontam, "_TEXTS_PER_BATCH", 7)       # batch boundaries change nothing
    assert np.array_equal(match_counts(train, index), whole)
    index.save(tmp_path / "idx.npz")
    loaded = decontam.EvalIndex.load(tmp_path / "idx.npz")
    assert np.array_equal(match_counts(train, loaded), whole) and loaded.item_ids == index.item_ids


def test_summary_per_pool_and_eval_set(index):
    w = decontam.words(EVAL[1])
    pools = {"clean": [_filler(30, i) for i in range(4)],
             "dirty": [EVAL[0], " ".join(w[:13]), _filler(30), EVAL[3]]}
    df = contamination_summary(pools, index).set_index(["pool", "eval_set"])
    assert df.loc[("clean", "all"), "n_contaminated"] == 0
    assert df.loc[("dirty", "arc"), "n_contaminated"] == 2 and df.loc[("dirty", "arc"), "n_eval_hit"] == 2
    assert df.loc[("dirty", "other"), "n_contaminated"] == 1 and df.loc[("dirty", "other"), "frac_eval_hit"] == 0.5
    assert df.loc[("dirty", "all"), "frac_contaminated"] == 0.75 and df.loc[("dirty", "all"), "n_eval"] == 4

"""exp_curriculum metrics on degenerate and hostile input: vocd-D of all-unique text, text without words, lone
surrogates and a seeded random sweep over odd strings (hypothesis is not installed)."""

from __future__ import annotations

import json
import math
import time
from fractions import Fraction

import numpy as np
import pytest

from exp_curriculum import metrics as M
from exp_curriculum import selection as S


def test_vocd_all_unique_is_inf_at_every_length():
    # every sample is all-unique (TTR = 1): D is unbounded whatever the length (HEAD: 250 tokens gave 8.8e5)
    for n in (50, 51, 199, 200, 250, 777, 1000, 5000, 20000):
        assert M.vocd(np.arange(n)) == math.inf, n
        assert M.vocd(np.arange(n) * 7 + 3) == math.inf   # not only 0..n-1
    assert math.isnan(M.vocd(np.arange(49)))


def _exact_deficits(freqs: list[int], ns: range) -> list[Fraction]:
    """1 - expected TTR of a sample of n tokens, exactly: E[types] = sum_t 1 - C(N - f_t, n) / C(N, n)."""
    total = sum(freqs)
    out = []
    for n in ns:
        expected_types = sum(1 - Fraction(math.comb(total - f, n), math.comb(total, n)) for f in freqs)
        out.append(1 - expected_types / n)
    return out


def _mp_vocd(freqs: list[int], ns=range(35, 51)) -> float:
    """Least-squares D (residuals in TTR, as curve_fit) with 60-digit arithmetic: the root of d cost / d D."""
    import mpmath

    mpmath.mp.dps = 60
    target = [mpmath.mpf(x.numerator) / x.denominator for x in _exact_deficits(freqs, ns)]

    def cost(log_d):
        d = mpmath.e ** log_d
        return sum((t - (1 - d / n * (mpmath.sqrt(1 + 2 * n / d) - 1))) ** 2 for t, n in zip(target, ns))

    # crude grid for a bracket, then the stationary point of the cost in log D
    grid = [mpmath.mpf(k) / 4 for k in range(-8, 160)]
    k = min(range(len(grid)), key=lambda i: cost(grid[i]))
    root = mpmath.findroot(lambda x: mpmath.diff(cost, x), grid[k])
    return float(mpmath.e ** root)


@pytest.mark.parametrize("n_tokens", [50, 120, 250, 1000, 4000])
def test_vocd_one_repeat_is_finite_and_equals_exact_least_squares(n_tokens):
    # one type seen twice, every other type once: D finite, huge, and the true least-squares minimiser
    ids = np.r_[0, np.arange(n_tokens - 1)]
    freqs = [2] + [1] * (n_tokens - 2)
    assert M.vocd(ids) == pytest.approx(_mp_vocd(freqs), rel=1e-5)


def test_vocd_small_vocabulary_equals_exact_least_squares():
    rng = np.random.default_rng(3)
    for _ in range(3):
        ids = rng.integers(0, 40, 90)
        freqs = np.unique(ids, return_counts=True)[1].tolist()
        assert M.vocd(ids) == pytest.approx(_mp_vocd(freqs), rel=1e-5)


def test_text_without_words_readability_defined():
    textstat = pytest.importorskip("textstat")
    textstat.set_rounding(False)
    try:
        for text in ("", "   ", "\n\t \u2028", "...", "!!! ???", "😀 😀", "— « » —"):
            for lang, ts_lang in (("en", "en_US"), ("fr", "fr")):
                textstat.set_lang(ts_lang)
                ours = M.readability_textstat(text, lang)
                # the reproduction gives textstat's intercepts (HEAD gave NaN)
                assert ours["fre"] == pytest.approx(textstat.flesch_reading_ease(text), abs=1e-9)
                assert ours["fkgl"] == pytest.approx(textstat.flesch_kincaid_grade(text), abs=1e-9)
                # our default: undefined, NaN (documented)
                r = M.readability(text, lang)
                assert math.isnan(r["fre"]) and math.isnan(r["fkgl"]) and r["n_sentences"] == 0
    finally:
        textstat.set_lang("en_US")
        textstat.set_rounding(True)


def test_lone_surrogate_does_not_crash_and_is_replaced():
    text = json.loads('"x \\ud83d y"')                 # HEAD: UnicodeEncodeError in document_metrics
    out = M.document_metrics(text, "en")
    assert out["n_bytes"] == len("x \ufffd y".encode("utf-8"))
    same = M.document_metrics("x \ufffd y", "en")
    assert out.keys() == same.keys()
    assert all(out[k] == same[k] or (math.isnan(out[k]) and math.isnan(same[k])) for k in out)
    pair = json.loads('"ok \\ud83d\\ude00"')            # a valid pair written as two escapes is one emoji
    assert M.clean_text(pair) == "ok \U0001F600"
    assert M.clean_text("plain") == "plain"
    sig = S.minhash_signatures([text, "x \ufffd y"], S.MinHashConfig(num_perm=16))
    assert np.array_equal(sig[0], sig[1])


def test_long_unbroken_token_is_linear():
    # HEAD's abbreviation check ran a `[\w.]+$` search per boundary: quadratic in a long token (≈5 s at 20k)
    text = "ab" * 40_000 + " x. y z w."
    t0 = time.perf_counter()
    M.split_sentences(text, "en")
    assert time.perf_counter() - t0 < 0.5


_ODD = ["", " ", "\t\n\r\x0b\x0c", "\x00", "\x00\x01\x1f\x7f", "\u200b\u200d\ufeff", "\u202eabc\u202c",
        "שלום עולם", "مرحبا بالعالم", "😀🙃👍🏽", "🏳️‍🌈", "\ud83d", "\udc00x", "e\u0301\u0301\u0301",
        "l'", "qu'", "'", "--", "...", "?!", "Dr.", "a.b.c.", "x" * 3000, "ab-" * 500, "42 3.14 1e9",
        "Straße", "İı", "ΣΑΣ", "ǅ", "\u3000日本語のテキスト。", "한국어", "\U0010FFFF", "\ue000", "\\", "\"'`"]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pools = [range(0x20, 0x7F), range(0x00, 0x20), range(0xD800, 0xE000), range(0x0590, 0x0700),
             range(0x1F300, 0x1FAFF), range(0x2000, 0x2070), range(0x00C0, 0x0250), range(0x4E00, 0x4E80)]
    out = []
    for _ in range(n):
        pieces = []
        for _ in range(int(rng.integers(0, 12))):
            if rng.random() < 0.3:
                pieces.append(_ODD[int(rng.integers(len(_ODD)))])
            else:
                pool = pools[int(rng.integers(len(pools)))]
                pieces.append("".join(chr(pool[int(k)]) for k in rng.integers(0, len(pool), rng.integers(1, 30))))
            pieces.append(" " if rng.random() < 0.7 else rng.choice(["\n", "\n\n", ". ", "", "\t"]))
        out.append("".join(pieces))
    return out


def test_random_odd_strings_never_crash_and_give_documented_values():
    keys = set(M.document_metrics("The cat sat on the mat.", "en"))
    texts = _ODD + _random_strings(300) + [" ".join(_ODD) * 3]
    for text in texts:
        for lang in ("en", "fr"):
            out = M.document_metrics(text, lang)
            assert set(out) == keys, repr(text)
            n = out["n_tokens"]
            assert n >= 0 and out["n_bytes"] >= 0
            finite = {k2 for k2, v in out.items() if math.isfinite(v)}
            # undefined only where the docstring says so
            assert math.isnan(out["ttr"]) == (n == 0) and math.isnan(out["mtld"]) == (n == 0)
            assert math.isnan(out["hdd"]) == (n < 42)
            assert math.isnan(out["vocd"]) == (n < 50)
            if math.isinf(out["vocd"]):
                assert out["n_types"] == n
            assert math.isnan(out["fre"]) == math.isnan(out["fkgl"])
            assert keys - {"ttr", "root_ttr", "mtld", "hdd", "vocd", "asl", "asw", "fre", "fkgl"} <= finite
            ts = M.readability_textstat(text, lang)
            assert math.isfinite(ts["fre"]) and math.isfinite(ts["fkgl"])
    for hashing in ("sha1", "fast"):
        sig = S.minhash_signatures(texts, S.MinHashConfig(num_perm=16, hashing=hashing))
        assert sig.shape == (len(texts), 16)

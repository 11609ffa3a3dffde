"""Documents/s of our metrics and MinHash against the reference packages on the same real documents, both
sides doing the same work from the same input.

    python exp_curriculum/bench.py --profile quick [bench_docs=200] [bench_repeats=3]
Appends rows to the results table (table "curriculum_bench": method = ours|reference, metric = docs_per_s;
params: task, speedup, aim, aim_met).

Same work on both sides:
- lexical tasks (`mtld`, `hdd`, `vocd`) start from the document string: tokenisation (our `tokenize`, which
  the reference also gets, as a token list, because lexicalrichness's own tokenizer splits differently and
  the values would differ), then our string -> id conversion (as `document_metrics` does it) and kernel,
  vs lexicalrichness on the tokens. `mtld_tokens` / `hdd_tokens` start both sides from the token list
  (ours still converts tokens to ids).
- `flesch`: textstat's `set_lang` is called once per language (documents grouped by language), as a user
  scoring a corpus would; it rebuilds a Pyphen object and clears textstat's caches, which per document
  would charge textstat for work it does not need.
- `mtld+hdd+vocd+flesch`: the four metrics of one document, timed directly (one tokenisation per side).
- `minhash_sha1`: our signatures from the strings vs datasketch's fastest API, `MinHash.bulk` over the same
  shingle lists (datasketch has no shingler; ours is shared); the signatures are asserted bit-identical
  before timing. `minhash_fast` (our fast hashing, a different hash family) is timed against the same
  datasketch call: not bit-identical, so it does not count for the MinHash aim.
Values are asserted equal to the reference's before any timing (vocd-D: lexicalrichness samples randomly,
our exact fit is compared in the tests). Aims: >= 20x for the metrics, >= 5x for bit-identical MinHash;
each row prints whether its aim is met.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import default_data_dir, parse_config, to_dict
from common.results import Run
from exp_curriculum import metrics as M
from exp_curriculum.config import Config
from exp_curriculum.corpus import load_corpus
from exp_curriculum.selection import MinHashConfig, minhash_signatures, shingles

METRIC_AIM, MINHASH_AIM = 20.0, 5.0
VOCD_DOCS = 20          # lexicalrichness's vocd draws 3 x 100 random samples per size: slow


@dataclass
class BenchConfig(Config):
    bench_docs: int = 200
    bench_repeats: int = 3      # timed passes per side; the fastest counts (the machine is shared)


Docs = list[tuple[str, str]]


def ids_of(toks: list[str]) -> np.ndarray:
    """Token ids exactly as `metrics.document_metrics` computes them."""
    return np.unique(toks, return_inverse=True)[1].astype(np.int64) if toks else np.zeros(0, np.int64)


def _rate(batch: Callable[[], object], n: int, repeats: int, clear: Callable[[], None] | None = None) -> float:
    """Documents/s of `batch` (one call processes n documents): one untimed warm-up call (numba compiled,
    per-word syllable caches warm on both sides), then the fastest of `repeats` timed calls; `clear` runs
    before each timed call (textstat's per-text lru_caches always; ours only for "flesch_cold")."""
    batch()
    best = float("inf")
    for _ in range(repeats):
        if clear:
            clear()
        t0 = time.perf_counter()
        batch()
        best = min(best, time.perf_counter() - t0)
    return n / best


def by_language(docs: Docs) -> list[tuple[str, list[str]]]:
    return [(lg, [t for t, _ in g]) for lg, g in itertools.groupby(sorted(docs, key=lambda d: d[1]),
                                                                 key=lambda d: d[1])]


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_config(BenchConfig, Path(__file__).parent / "configs", argv=argv)
    import textstat
    from datasketch import MinHash
    from lexicalrichness import LexicalRichness

    ds = load_corpus(default_data_dir(), cfg.corpus)
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(ds), min(cfg.bench_docs, len(ds)), replace=False)
    docs: Docs = sorted(((ds[int(i)]["text"], ds[int(i)]["language"]) for i in pick), key=lambda d: d[1])
    lex = [d for d in docs if len(M.tokenize(*d)) >= 50]     # HD-D needs 42 tokens, vocd 50
    toks = [M.tokenize(t, lg) for t, lg in lex]
    textstat.set_rounding(False)
    lr = LexicalRichness

    def lang_code(lg: str) -> str:
        return "en_US" if lg == "en" else "fr"

    def ts_batch(group: Docs) -> list[tuple[float, float]]:
        out = []
        for lg, texts in by_language(group):
            textstat.set_lang(lang_code(lg))
            out += [(textstat.flesch_reading_ease(t), textstat.flesch_kincaid_grade(t)) for t in texts]
        return out

    def ours_flesch(group: Docs) -> list[tuple[float, float]]:
        return [tuple(M.readability_textstat(t, lg).values()) for t, lg in group]

    def ours_bundle(group: Docs) -> None:
        for t, lg in group:
            i = ids_of(M.tokenize(t, lg))
            M.mtld(i), M.hdd(i), M.vocd(i), M.readability_textstat(t, lg)

    def ref_bundle(group: Docs) -> None:
        for lg, texts in by_language(group):
            textstat.set_lang(lang_code(lg))
            for t in texts:
                r = lr(M.tokenize(t, lg), None, None)
                r.mtld(0.72), r.hdd(42), r.vocd()
                textstat.flesch_reading_ease(t), textstat.flesch_kincaid_grade(t)

    # same values on both sides, checked before anything is timed
    for (_, lg), tk in zip(lex, toks):
        i, r = ids_of(tk), lr(tk, None, None)
        assert np.isclose(M.mtld(i), r.mtld(0.72), rtol=1e-12, atol=0), f"mtld differs on a {lg} document"
        assert np.isclose(M.hdd(i), r.hdd(42), rtol=1e-9, atol=0), f"hdd differs on a {lg} document"
    np.testing.assert_allclose(ours_flesch(docs), ts_batch(docs), rtol=0, atol=1e-9,
                               err_msg="FRE/FKGL differ from textstat 0.7.4")

    vocd_docs = lex[:VOCD_DOCS]
    # task: (ours batch, reference batch, documents, clear ours, aim)
    tasks = {
        "mtld": (lambda: [M.mtld(ids_of(M.tokenize(t, lg))) for t, lg in lex],
                 lambda: [lr(M.tokenize(t, lg), None, None).mtld(0.72) for t, lg in lex], len(lex), None),
        "hdd": (lambda: [M.hdd(ids_of(M.tokenize(t, lg))) for t, lg in lex],
                lambda: [lr(M.tokenize(t, lg), None, None).hdd(42) for t, lg in lex], len(lex), None),
        "vocd": (lambda: [M.vocd(ids_of(M.tokenize(t, lg))) for t, lg in vocd_docs],
                 lambda: [lr(M.tokenize(t, lg), None, None).vocd() for t, lg in vocd_docs], len(vocd_docs), None),
        "mtld_tokens": (lambda: [M.mtld(ids_of(tk)) for tk in toks],
                        lambda: [lr(tk, None, None).mtld(0.72) for tk in toks], len(toks), None),
        "hdd_tokens": (lambda: [M.hdd(ids_of(tk)) for tk in toks],
                       lambda: [lr(tk, None, None).hdd(42) for tk in toks], len(toks), None),
        "flesch": (lambda: ours_flesch(docs), lambda: ts_batch(docs), len(docs), None),
        "flesch_cold": (lambda: ours_flesch(docs), lambda: ts_batch(docs), len(docs), M.clear_syllable_caches),
        "mtld+hdd+vocd+flesch": (lambda: ours_bundle(vocd_docs), lambda: ref_bundle(vocd_docs), len(vocd_docs),
                                 None),
    }
    run = Run("exp_curriculum", config=to_dict(cfg), seed=cfg.seed, profile=args.profile_name)
    unmet: list[str] = []

    def record(name: str, r_ours: float, r_ref: float, n: int, aim: float | None, extra: dict) -> None:
        speed = r_ours / r_ref
        met = None if aim is None else bool(speed >= aim)
        verdict = "aim n/a" if aim is None else f"aim >= {aim:.0f}x {'met' if met else 'NOT met'}"
        print(f"{name:21s} ours {r_ours:10.1f} docs/s  reference {r_ref:8.1f} docs/s  x{speed:6.1f}  {verdict}")
        if met is False:
            unmet.append(f"{name} (x{speed:.1f} < {aim:.0f}x)")
        for method, rate in (("ours", r_ours), ("reference", r_ref)):
            run.log(table="curriculum_bench", method=method, metric="docs_per_s", value=rate, n=n,
                    params={"task": name, "speedup": speed, "aim": aim, "aim_met": met, **extra})

    for name, (ours, ref, n, clear_ours) in tasks.items():
        r_ours = _rate(ours, n, cfg.bench_repeats, clear_ours)
        r_ref = _rate(ref, n, cfg.bench_repeats, textstat.textstat._cache_clear if "flesch" in name else None)
        record(name, r_ours, r_ref, n, METRIC_AIM, {})

    texts = [t for t, _ in docs] * 5
    sha1_cfg = MinHashConfig(num_perm=128, ngram=5, seed=1, hashing="sha1")
    ref_sig = np.array([m.hashvalues for m in MinHash.bulk([shingles(t, 5) for t in texts], num_perm=128, seed=1)])
    if not np.array_equal(minhash_signatures(texts, sha1_cfg).astype(np.uint64), ref_sig.astype(np.uint64)):
        raise AssertionError("sha1 MinHash signatures are not bit-identical to datasketch's")

    def ref_minhash() -> list:
        return MinHash.bulk([shingles(t, 5) for t in texts], num_perm=128, seed=1)

    r_ref = _rate(ref_minhash, len(texts), cfg.bench_repeats)
    for hashing in ("sha1", "fast"):
        mcfg = MinHashConfig(num_perm=128, ngram=5, seed=1, hashing=hashing)
        r_ours = _rate(lambda mcfg=mcfg: minhash_signatures(texts, mcfg), len(texts), cfg.bench_repeats)
        record(f"minhash_{hashing}", r_ours, r_ref, len(texts), MINHASH_AIM if hashing == "sha1" else None,
               {"bit_identical": hashing == "sha1", "reference_api": "datasketch MinHash.bulk"})
    print("aims met on every row" if not unmet else "aims NOT met: " + ", ".join(unmet))
    run.finish()


if __name__ == "__main__":
    main()

"""Documents/s of our metrics and MinHash against the reference packages on the same real documents.

    python exp_curriculum/bench.py --profile quick [bench_docs=200]
Appends rows to the results table (table "curriculum_bench": method = ours|reference, metric = docs_per_s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import default_data_dir, parse_config, to_dict
from common.results import Run
from exp_curriculum import metrics as M
from exp_curriculum.config import Config
from exp_curriculum.corpus import load_corpus
from exp_curriculum.selection import MinHashConfig, minhash_signatures, shingles


@dataclass
class BenchConfig(Config):
    bench_docs: int = 200


def _rate(fn, docs, clear=None) -> float:
    """Documents/s of fn over docs, timed after one untimed warm-up pass (numba compiled, per-word syllable
    caches warm on both sides: ours and pyphen's; `clear` empties caches before timing: textstat's per-text
    lru_caches always, ours only for the "flesch_cold" row)."""
    for d in docs:
        fn(*d)
    if clear:
        clear()
    t0 = time.perf_counter()
    for d in docs:
        fn(*d)
    return len(docs) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_config(BenchConfig, Path(__file__).parent / "configs", argv=argv)
    import textstat
    from datasketch import MinHash
    from lexicalrichness import LexicalRichness

    ds = load_corpus(default_data_dir(), cfg.corpus)
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(ds), min(cfg.bench_docs, len(ds)), replace=False)
    docs = [(ds[int(i)]["text"], ds[int(i)]["language"]) for i in pick]
    toks = [(M.tokenize(t, lg),) for t, lg in docs]
    toks = [t for t in toks if len(t[0]) >= 50]
    ids = [(np.unique(t[0], return_inverse=True)[1],) for t in toks]
    textstat.set_rounding(False)

    def ts(text, lang):
        textstat.set_lang("en_US" if lang == "en" else "fr")
        return textstat.flesch_reading_ease(text), textstat.flesch_kincaid_grade(text)

    pairs = {
        "mtld": (lambda i: M.mtld(i), ids, lambda t: LexicalRichness(t, None, None).mtld(0.72), toks),
        "hdd": (lambda i: M.hdd(i), ids, lambda t: LexicalRichness(t, None, None).hdd(42), toks),
        "vocd": (lambda i: M.vocd(i), ids, lambda t: LexicalRichness(t, None, None).vocd(), toks[:20]),
        "flesch": (lambda t, lg: M.readability_textstat(t, lg), docs, ts, docs),
        "flesch_cold": (lambda t, lg: M.readability_textstat(t, lg), docs, ts, docs),
    }
    run = Run("exp_curriculum", config=to_dict(cfg), seed=cfg.seed, profile=args.profile_name)
    sec_per_doc = {"ours": 0.0, "reference": 0.0}
    for name, (ours, ours_in, ref, ref_in) in pairs.items():
        r_ours = _rate(ours, ours_in, M.clear_syllable_caches if name == "flesch_cold" else None)
        r_ref = _rate(ref, ref_in, textstat.textstat._cache_clear if name.startswith("flesch") else None)
        print(f"{name:11s} ours {r_ours:10.1f} docs/s  reference {r_ref:8.1f} docs/s  x{r_ours / r_ref:.1f}")
        if name != "flesch_cold":
            sec_per_doc["ours"] += 1 / r_ours
            sec_per_doc["reference"] += 1 / r_ref
        for method, rate in (("ours", r_ours), ("reference", r_ref)):
            run.log(table="curriculum_bench", method=method, metric="docs_per_s", value=rate, n=len(ours_in),
                    params={"task": name, "speedup": r_ours / r_ref})
    # all four metrics of one document: per-document times add up
    bundle = {k: 1 / v for k, v in sec_per_doc.items()}
    speed = bundle["ours"] / bundle["reference"]
    print(f"bundle      ours {bundle['ours']:10.1f} docs/s  reference {bundle['reference']:8.1f} docs/s  x{speed:.1f}")
    for method, rate in bundle.items():
        run.log(table="curriculum_bench", method=method, metric="docs_per_s", value=rate, n=len(docs),
                params={"task": "mtld+hdd+vocd+flesch", "speedup": speed})
    texts = [t for t, _ in docs] * 5
    for hashing in ("sha1", "fast"):
        mcfg = MinHashConfig(num_perm=128, ngram=5, hashing=hashing)
        minhash_signatures(texts[:10], mcfg)   # warm-up (character table, imports)
        t0 = time.perf_counter()
        minhash_signatures(texts, mcfg)
        r_ours = len(texts) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for t in texts:
            m = MinHash(num_perm=128, seed=1)
            m.update_batch(shingles(t, 5))
        r_ref = len(texts) / (time.perf_counter() - t0)
        print(f"minhash-{hashing} ours {r_ours:10.1f} docs/s  datasketch {r_ref:8.1f} docs/s  x{r_ours / r_ref:.1f}")
        for method, rate in (("ours", r_ours), ("reference", r_ref)):
            run.log(table="curriculum_bench", method=method, metric="docs_per_s", value=rate, n=len(texts),
                    params={"task": f"minhash_{hashing}", "speedup": r_ours / r_ref})
    run.finish()


if __name__ == "__main__":
    main()

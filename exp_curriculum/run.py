"""Score the local EN/FR corpora: per-document metrics (parquet), summary rows, duplicates per method.

    python exp_curriculum/run.py --stage score --profile quick
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import default_data_dir, make_parser, parse_config, to_dict
from common.results import Run
from exp_curriculum.config import Config
from exp_curriculum.corpus import load_corpus
from exp_curriculum.diversity import diversity_coefficient, make_batches
from exp_curriculum.metrics import perplexity, score_dataset
from exp_curriculum.quality import askllm_scores, density_sample, kernel_density
from exp_curriculum.selection import d4_select, minhash_dedup, semdedup

SUMMARY_METRICS = ["char1_bits_per_char", "char1_mm_bits_per_char", "char3_bits_per_char",
                   "word1_bits_per_token", "deflate_bits_per_byte", "zstd_bits_per_byte", "lzma_bits_per_byte",
                   "deflate_ratio_lennorm", "ttr", "root_ttr", "mtld", "hdd", "vocd", "fre", "fkgl"]


def semantic_dedup(df: pd.DataFrame, cfg: Config) -> dict[str, np.ndarray]:
    from common.models import encode_texts, load_encoder

    rng = np.random.default_rng(cfg.seed)
    idx = rng.permutation(len(df))
    if cfg.semdedup.max_docs:
        idx = np.sort(idx[: cfg.semdedup.max_docs])
    model, tok = load_encoder("all-minilm-l6-v2")
    emb = encode_texts(model, tok, df["text"].iloc[idx].tolist(), max_length=cfg.semdedup.max_length).numpy()
    s = cfg.semdedup
    dens = kernel_density(emb, cfg.density.bandwidth)
    picked = np.zeros(len(idx), dtype=bool)
    picked[density_sample(dens, max(1, int(cfg.density.sample_fraction * len(idx))), cfg.seed)] = True
    return {"idx": idx, "semdedup": semdedup(emb, s.n_clusters, s.eps, cfg.seed),
            "d4": d4_select(emb, s.n_clusters, s.eps, s.d4_keep_fraction, cfg.seed),
            "density": dens, "density_pick": picked}


def model_scores(df: pd.DataFrame, cfg: Config) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ASK-LLM P(yes) and LM perplexity on a seeded sample of documents per language."""
    import torch

    from common.models import load_causal_lm

    torch.set_num_threads(cfg.model_scores.threads)
    m = cfg.model_scores
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(df["language"] == lg),
                                             min(m.docs_per_language, int((df["language"] == lg).sum())),
                                             replace=False) for lg in sorted(df["language"].unique())]))
    model, tok = load_causal_lm(m.model)
    texts = df["text"].iloc[idx].tolist()
    ask = askllm_scores(model, tok, texts, m.batch_size, m.max_doc_tokens)
    ppl = perplexity(model, tok, texts, max_length=m.max_doc_tokens, batch_size=m.batch_size)
    return idx, {"askllm": ask, "lm_nll": np.array([p["nll"] for p in ppl]),
                 "lm_bits_per_byte": np.array([p["lm_bits_per_byte"] for p in ppl])}


def diversity_by_corpus(df: pd.DataFrame, cfg: Config) -> dict[str, dict[str, float]]:
    """Diversity coefficient of each language x genre corpus and of all documents of each language."""
    import torch

    from common.models import load_causal_lm

    torch.set_num_threads(cfg.model_scores.threads)
    d = cfg.diversity
    probe, tok = load_causal_lm(d.probe)
    groups = {f"{lg}/{ge}": g for (lg, ge), g in df.groupby(["language", "genre"])}
    groups.update({f"{lg}/all": g for lg, g in df.groupby("language")})
    out = {}
    for name, g in sorted(groups.items()):
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in g["text"].tolist()[:2000]]
        try:
            batches = make_batches(ids, d.n_batches, d.batch_size, d.seq_len, cfg.seed)
        except ValueError as exc:
            print(f"diversity: skipping {name}: {exc}")
            continue
        out[name] = diversity_coefficient(probe, batches, finetune_epochs=d.finetune_epochs,
                                          micro_batch=d.batch_size)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--stage", default=None, help="only 'score' exists (same as stage=score)")
    cfg, args = parse_config(Config, Path(__file__).parent / "configs", argv=argv, parser=parser)
    assert isinstance(args, argparse.Namespace)
    if args.stage not in (None, "score"):
        parser.error(f"--stage {args.stage}: only 'score' is implemented")
    data = default_data_dir()
    if data is None:
        raise SystemExit("no data folder: pass --data-dir or set LLM4ALL_DATA")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run("exp_curriculum", config=to_dict(cfg), seed=cfg.seed, profile=args.profile_name)

    t0 = time.time()
    ds = load_corpus(data, cfg.corpus)
    scored = score_dataset(ds, num_proc=cfg.num_proc, n_buckets=cfg.n_length_buckets)
    t_metrics = time.time() - t0
    df = scored.to_pandas()

    keep_mh, pairs = minhash_dedup(df["text"].tolist(), cfg.minhash)
    df["minhash_keep"] = keep_mh
    dups = {"minhash": int((~keep_mh).sum())}
    if cfg.semdedup.enabled:
        sem = semantic_dedup(df, cfg)
        for name in ("semdedup", "d4"):
            col = np.full(len(df), np.nan)
            col[sem["idx"]] = sem[name]
            df[f"{name}_keep"] = col
        for name in ("density", "density_pick"):
            col = np.full(len(df), np.nan)
            col[sem["idx"]] = sem[name]
            df[name] = col
        dups["semdedup"] = int((~sem["semdedup"]).sum())
        dups["d4_removed"] = int((~sem["d4"]).sum())
    if cfg.model_scores.enabled:
        idx, cols = model_scores(df, cfg)
        for name, vals in cols.items():
            col = np.full(len(df), np.nan)
            col[idx] = vals
            df[name] = col
    divs = diversity_by_corpus(df, cfg) if cfg.diversity.enabled else {}
    df.drop(columns=["text"]).to_parquet(out_dir / "scores.parquet")
    elapsed = time.time() - t0

    for (lang, genre), g in df.groupby(["language", "genre"]):
        for m in SUMMARY_METRICS:
            v = g[m].replace([np.inf, -np.inf], np.nan).dropna()
            if len(v):
                for q in (0.1, 0.5, 0.9):
                    run.log(table="curriculum_scores", method=m, metric=f"q{int(q * 100)}",
                            value=float(v.quantile(q)), n=len(v), params={"language": lang, "genre": genre})
                run.log(table="curriculum_scores", method=m, metric="mean", value=float(v.mean()),
                        stderr=float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None, n=len(v),
                        params={"language": lang, "genre": genre})
    extra_cols = [c for c in ("askllm", "lm_bits_per_byte", "density") if c in df]
    for (lang, genre), g in df.groupby(["language", "genre"]):
        for m in extra_cols:
            v = g[m].dropna()
            if len(v):
                run.log(table="curriculum_scores", method=m, metric="mean", value=float(v.mean()), n=len(v),
                        stderr=float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None,
                        params={"language": lang, "genre": genre})
    for name, r in divs.items():
        lang, corpus = name.split("/")
        run.log(table="curriculum_diversity", method="task2vec", metric="div_coeff", value=r["div_coeff"],
                stderr=r["ci95"] / 1.96, n=int(r["n_pairs"]),
                params={"language": lang, "corpus": corpus, "probe": cfg.diversity.probe,
                        "batch_size": cfg.diversity.batch_size, "seq_len": cfg.diversity.seq_len})
    summary = SUMMARY_METRICS + extra_cols
    corr = df[summary].replace([np.inf, -np.inf], np.nan).corr(method="spearman")
    for a in summary:
        for b in summary:
            if np.isfinite(corr.loc[a, b]):
                run.log(table="curriculum_corr", method=a, metric=b, value=float(corr.loc[a, b]),
                        n=int(df[[a, b]].dropna().shape[0]))
    for name, count in dups.items():
        n = len(df) if name == "minhash" else min(len(df), cfg.semdedup.max_docs or len(df))
        run.log(table="curriculum_dedup", method=name, metric="removed", value=int(count), n=n,
                params={"threshold": cfg.minhash.threshold if name == "minhash" else cfg.semdedup.eps})
    run.log(table="curriculum_runtime", method="score_stage", metric="seconds", value=elapsed, n=len(df),
            params={"mb": float(df["n_bytes"].sum() / 1e6), "metrics_seconds": t_metrics})
    run.finish()
    print(f"scored {len(df)} documents ({df['n_bytes'].sum() / 1e6:.1f} MB) in {elapsed:.0f}s "
          f"(metrics {t_metrics:.0f}s); duplicates: {dups}; scores -> {out_dir / 'scores.parquet'}")
    for name, r in divs.items():
        print(f"diversity coefficient {name}: {r['div_coeff']:.4f} ± {r['ci95']:.4f}")


if __name__ == "__main__":
    main()

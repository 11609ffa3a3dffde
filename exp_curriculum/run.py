"""Score the local EN/FR corpora in stages on disk: per-document metrics, duplicates, model scores,
diversity coefficients, then a summary that logs the rows and writes the combined per-document scores.

    python exp_curriculum/run.py --profile quick                   # every stage; complete ones are skipped
    python exp_curriculum/run.py --profile quick --stage summary   # the rows again, from the stages' outputs
    python exp_curriculum/run.py --profile quick --list-stages     # each stage's folder and state

Outputs, one folder per stage and config hash (<outputs>/exp_curriculum/<stage>/<hash>/):
  metrics       metrics.parquet: id, text, source, genre, language, sizes and every model-free metric
  dedup         dedup.parquet: minhash_keep; density, density_pick on the embedded sample and semdedup_keep,
                d4_semdedup_keep, d4_keep on its MinHash survivors (False for its MinHash-removed documents;
                NaN outside the sample); embeddings.npy + embedded_idx.npy (MiniLM); dedup.json (counts)
  decontam      decontam.parquet: documents sharing a 13-gram with ARC / MMLU per language x source x genre;
                decontam_docs.parquet (per document); decontam.json
  model_scores  model_scores.parquet: askllm, lm_nll, lm_bits_per_byte on a seeded sample (NaN elsewhere)
  diversity     diversity.json: Task2Vec diversity coefficient per language x genre and per language
  summary       scores.parquet: every per-document column except the text (join it from metrics.parquet)
Every parquet but decontam.parquet (a summary) holds the rows of metrics.parquet in the same order,
with its `id` column. A disabled part
(`semdedup.enabled=false`, `model_scores.enabled=false`, `diversity.enabled=false`) writes a marker saying so.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd

from common import paths
from common.stages import Stage, StageContext, StageInputError, run_experiment
from exp_curriculum.config import Config
from exp_curriculum.corpus import load_corpus
from exp_curriculum.decontam_stage import stage_decontam
from exp_curriculum.diversity import diversity_coefficient, make_batches, sample_documents
from exp_curriculum.metrics import perplexity, score_dataset
from exp_curriculum.quality import (
    askllm_probs,
    askllm_scores,
    density_sample,
    kernel_density,
    normalised_yes,
    pairwise_accuracy,
    planted_documents,
)
from exp_curriculum.selection import d4, minhash_dedup, semdedup
from exp_curriculum.study_stages import STAGES as STUDY_STAGES

EXP = "exp_curriculum"
SUMMARY_METRICS = ["char1_bits_per_char", "char1_mm_bits_per_char", "char3_bits_per_char",
                   "word1_bits_per_token", "deflate_bits_per_byte", "zstd_bits_per_byte", "lzma_bits_per_byte",
                   "deflate_ratio_lennorm", "ttr", "root_ttr", "mtld", "hdd", "vocd", "fre", "fkgl"]
EXTRA_METRICS = ["askllm", "lm_bits_per_byte", "density"]   # summarised when their stage produced them


# ---------------------------------------------------------------------------------- helpers
def read_parquet(ctx: StageContext, stage: str, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A parquet file written by input stage ``stage``."""
    p = ctx.input(stage) / name
    try:
        return pd.read_parquet(p, columns=columns)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise StageInputError(f"cannot read {paths.repo_relative(p)} (output of stage '{stage}'): {exc}. "
                              f"Rerun it with --stage {stage} --force") from None


def _full(n: int, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A length-n float column holding ``values`` at ``idx`` and NaN elsewhere."""
    col = np.full(n, np.nan)
    col[idx] = values
    return col


def _join(df: pd.DataFrame, extra: pd.DataFrame, stage: str) -> None:
    """Add the columns of a per-document stage output to ``df`` (same rows, same order)."""
    if len(extra) != len(df) or not (extra["id"].to_numpy() == df["id"].to_numpy()).all():
        raise StageInputError(f"the documents of stage '{stage}' do not match metrics.parquet: "
                              f"rerun it with --stage {stage} --force")
    for c in extra.columns:
        if c != "id":
            df[c] = extra[c].to_numpy()


def load_documents(cfg: Config):
    """The corpus from the offline data root; a missing root or text folder is the user's error (exit 2)."""
    from common.data import DatasetNotAvailableError, DataValidationError, data_root

    root = data_root()
    if not (root / "text").is_dir():
        raise DatasetNotAvailableError(f"no text folder in the data root {root}: set LLM4ALL_DATA or pass "
                                       "--data-dir (the folder holding text/en, text/fr)")
    try:
        return load_corpus(root, cfg.corpus)
    except FileNotFoundError as exc:
        raise DatasetNotAvailableError(str(exc)) from None
    except ValueError as exc:  # load_corpus names the file and line of a malformed row
        raise DataValidationError(str(exc)) from None


# ---------------------------------------------------------------------------------- computations
def semantic_dedup(texts: list[str], cfg: Config, minhash_keep: np.ndarray | None = None,
                   ) -> dict[str, np.ndarray | float]:
    """Density on MiniLM embeddings of a seeded sample of the documents; SemDeDup and D4 on the sample's
    MinHash survivors only (`minhash_keep`; None = all): D4 = MinHash -> SemDeDup (target ratio or fixed eps)
    -> SSL prototypes. Sampled MinHash-removed documents get False in "semdedup" and "d4"."""
    import torch

    from common.models import encode_texts, load_encoder

    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    idx = rng.permutation(len(texts))
    if cfg.semdedup.max_docs:
        idx = np.sort(idx[: cfg.semdedup.max_docs])
    model, tok = load_encoder("all-minilm-l6-v2")
    emb = encode_texts(model, tok, [texts[i] for i in idx], max_length=cfg.semdedup.max_length).numpy()
    s = cfg.semdedup
    dens = kernel_density(emb, cfg.density.bandwidth)
    picked = np.zeros(len(idx), dtype=bool)
    picked[density_sample(dens, max(1, int(cfg.density.sample_fraction * len(idx))), cfg.seed)] = True
    mh = np.ones(len(idx), dtype=bool) if minhash_keep is None else np.asarray(minhash_keep, dtype=bool)[idx]
    sem = np.zeros(len(idx), dtype=bool)
    sem[mh] = semdedup(emb[mh], s.n_clusters, s.eps, cfg.seed)     # SemDeDup alone, at the fixed eps
    d4_kw = {"dedup_remove": 1 - s.d4_dedup_keep} if s.d4_dedup == "ratio" else {"eps": s.eps}
    res = d4(emb, s.n_clusters, s.d4_keep_fraction, cfg.seed, minhash_keep=mh, **d4_kw)
    return {"idx": idx, "emb": emb, "minhash_keep": mh, "semdedup": sem, "d4_semdedup": res.semdedup_keep,
            "d4": res.keep, "d4_eps": res.eps, "density": dens, "density_pick": picked}


def model_scores(df: pd.DataFrame, cfg: Config) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ASK-LLM P(yes) and LM perplexity on a seeded sample of documents per language."""
    import torch

    from common.models import load_causal_lm

    torch.set_num_threads(cfg.threads)
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


# DiversityConfig keys that are task2vec_embedding's options
TASK2VEC_KEYS = ("micro_batch", "finetune_epochs", "finetune_steps", "lr", "weight_decay", "adam_eps",
                 "fisher_batches", "untie_head", "include_biases", "target_shift", "fisher_on_padding")


def diversity_by_corpus(df: pd.DataFrame, cfg: Config) -> dict[str, dict]:
    """Diversity coefficient of each language x genre corpus and of each language ("all"). Every group's
    batches come from a seeded sample of `diversity.max_docs` of its documents, drawn over the whole group
    (the "all" group: `diversity.all_sampling` over every genre of the language)."""
    import torch

    from common.models import load_causal_lm

    torch.set_num_threads(cfg.threads)
    d = cfg.diversity
    probe, tok = load_causal_lm(d.probe)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    opts = {k: getattr(d, k) for k in TASK2VEC_KEYS}
    groups = {f"{lg}/{ge}": (g, "uniform") for (lg, ge), g in df.groupby(["language", "genre"])}
    groups.update({f"{lg}/all": (g, d.all_sampling) for lg, g in df.groupby("language")})
    out = {}
    for name, (g, how) in sorted(groups.items()):
        sub = g.iloc[sample_documents(g["genre"].to_numpy(), d.max_docs, cfg.seed, how)]
        ids = tok(sub["text"].tolist(), add_special_tokens=False, truncation=True,
                  max_length=d.seq_len)["input_ids"]
        try:
            batches = make_batches(ids, d.n_batches, d.batch_size, d.seq_len, cfg.seed, pad_id,
                                   d.fresh_seed_per_batch)
        except ValueError as exc:
            print(f"diversity: skipping {name}: {exc}")
            continue
        r = diversity_coefficient(probe, batches, seed=cfg.seed, fresh_seed_per_batch=d.fresh_seed_per_batch,
                                  **opts)
        out[name] = {**r, "n_docs": len(sub),
                     "docs_per_genre": {k: int(v) for k, v in sub["genre"].value_counts().sort_index().items()}}
    return out


# ---------------------------------------------------------------------------------- stages
# Each stage records its own compute time ("seconds" in its JSON) for the curriculum_runtime row.
def stage_metrics(ctx: StageContext) -> None:
    t0 = time.perf_counter()
    cfg = ctx.cfg
    scored = score_dataset(load_documents(cfg), num_proc=cfg.num_proc, n_buckets=cfg.n_length_buckets)
    df = scored.to_pandas()
    if not df["id"].is_unique:  # later stages and part 2 re-join on it
        raise RuntimeError("document ids are not unique")
    df.to_parquet(ctx.path("metrics.parquet"))
    seconds = time.perf_counter() - t0
    ctx.save_json("metrics.json", {"n_docs": len(df), "mb": float(df["n_bytes"].sum() / 1e6), "seconds": seconds,
                                   "docs_per_language": df["language"].value_counts().sort_index().to_dict()})
    print(f"metrics: {len(df)} documents ({df['n_bytes'].sum() / 1e6:.1f} MB) in {seconds:.0f} s")


def stage_dedup(ctx: StageContext) -> None:
    t0 = time.perf_counter()
    cfg = ctx.cfg
    df = read_parquet(ctx, "metrics", "metrics.parquet", columns=["id", "text"])
    texts = df["text"].tolist()
    keep_mh, _pairs = minhash_dedup(texts, cfg.minhash)
    out = pd.DataFrame({"id": df["id"], "minhash_keep": keep_mh})
    removed = [{"method": "minhash", "removed": int((~keep_mh).sum()), "n": len(df),
                "threshold": cfg.minhash.threshold}]
    if cfg.semdedup.enabled:
        sem = semantic_dedup(texts, cfg, keep_mh)
        idx, n_surv = sem["idx"], int(sem["minhash_keep"].sum())
        for name in ("semdedup", "d4_semdedup", "d4"):
            out[f"{name}_keep"] = _full(len(df), idx, sem[name])
        for name in ("density", "density_pick"):
            out[name] = _full(len(df), idx, sem[name])
        np.save(ctx.path("embeddings.npy"), sem["emb"])
        np.save(ctx.path("embedded_idx.npy"), idx)
        # SemDeDup and D4 counts are of the embedded MinHash survivors (the documents they saw)
        removed += [{"method": "semdedup", "removed": n_surv - int(sem["semdedup"].sum()), "n": n_surv,
                     "threshold": cfg.semdedup.eps},
                    {"method": "d4_semdedup", "removed": n_surv - int(sem["d4_semdedup"].sum()), "n": n_surv,
                     "threshold": sem["d4_eps"]},
                    {"method": "d4_removed", "removed": n_surv - int(sem["d4"].sum()), "n": n_surv,
                     "threshold": sem["d4_eps"]}]
    out.to_parquet(ctx.path("dedup.parquet"))
    ctx.save_json("dedup.json", {"semdedup_enabled": cfg.semdedup.enabled, "removed": removed,
                                 "seconds": time.perf_counter() - t0})
    print("dedup: removed " + ", ".join(f"{r['method']} {r['removed']}/{r['n']}" for r in removed))


def stage_model_scores(ctx: StageContext) -> None:
    t0 = time.perf_counter()
    cfg = ctx.cfg
    info: dict = {"enabled": cfg.model_scores.enabled}
    if cfg.model_scores.enabled:
        df = read_parquet(ctx, "metrics", "metrics.parquet", columns=["id", "text", "language"])
        idx, cols = model_scores(df, cfg)
        out = pd.DataFrame({"id": df["id"]})
        for name, vals in cols.items():
            out[name] = _full(len(df), idx, vals)
        out.to_parquet(ctx.path("model_scores.parquet"))
        info["n_scored"] = len(idx)
        print(f"model_scores: ASK-LLM + perplexity on {len(idx)} documents")
        if cfg.model_scores.planted_docs > 0:
            info["planted"] = planted_ranking(ctx, df, cfg)
    else:
        print("model_scores: disabled (model_scores.enabled=false)")
    ctx.save_json("model_scores.json", {**info, "seconds": time.perf_counter() - t0})


def planted_ranking(ctx: StageContext, df: pd.DataFrame, cfg: Config) -> dict[str, dict[str, float]]:
    """Raw P(yes) vs the normalised P(yes)/(P(yes)+P(no)) on planted documents: per language, a seeded sample
    of encyclopedia documents (all genres when there are none) and bad ones made from them; rows
    curriculum_askllm_planted (pairwise accuracy = the share of (good, bad) pairs ranked right)."""
    from common.models import load_causal_lm

    m = cfg.model_scores
    model, tok = load_causal_lm(m.model)
    out = {}
    meta = read_parquet(ctx, "metrics", "metrics.parquet", columns=["genre"])
    for lang in sorted(df["language"].unique()):
        pool = np.flatnonzero((df["language"] == lang).to_numpy() & (meta["genre"] == "encyclopedia").to_numpy())
        if not len(pool):
            pool = np.flatnonzero((df["language"] == lang).to_numpy())
        pick = np.random.default_rng([cfg.seed, 7]).permutation(pool)[: m.planted_docs]
        texts, labels = planted_documents(df["text"].iloc[np.sort(pick)].tolist(), cfg.seed)
        p_yes, p_no = askllm_probs(model, tok, texts, m.batch_size, m.max_doc_tokens)
        scores = {"askllm": p_yes, "askllm_norm": normalised_yes(p_yes, p_no)}
        out[lang] = {k: pairwise_accuracy(v, labels) for k, v in scores.items()}
        for k, acc in out[lang].items():
            ctx.log(table="curriculum_askllm_planted", method=k, metric="pairwise_accuracy", value=acc,
                    n=int(labels.sum() * (1 - labels).sum()),
                    params={"language": lang, "n_good": int(labels.sum()), "model": m.model})
        print(f"model_scores: planted good/bad ({lang}): pairwise accuracy raw P(yes) {out[lang]['askllm']:.3f}, "
              f"normalised {out[lang]['askllm_norm']:.3f}")
    return out


def stage_diversity(ctx: StageContext) -> None:
    t0 = time.perf_counter()
    cfg, d = ctx.cfg, ctx.cfg.diversity
    groups: dict[str, dict] = {}
    if d.enabled:
        df = read_parquet(ctx, "metrics", "metrics.parquet", columns=["text", "language", "genre"])
        groups = diversity_by_corpus(df, cfg)
        for name, r in groups.items():
            print(f"diversity coefficient {name}: {r['div_coeff']:.4f} (std {r['std']:.4f}, "
                  f"95% CI ± {r['ci95']:.4f}, {int(r['n_pairs'])} pairs)")
    else:
        print("diversity: disabled (diversity.enabled=false)")
    ctx.save_json("diversity.json", {"enabled": d.enabled, "probe": d.probe, "batch_size": d.batch_size,
                                     "seq_len": d.seq_len, "settings": dataclasses.asdict(d), "groups": groups,
                                     "seconds": time.perf_counter() - t0})


def stage_summary(ctx: StageContext) -> None:
    """Combine the per-document outputs into scores.parquet and log every row of the results table."""
    t0 = time.perf_counter()
    df = read_parquet(ctx, "metrics", "metrics.parquet")
    meta = ctx.load_json("metrics", "metrics.json")
    dedup = ctx.load_json("dedup", "dedup.json")
    _join(df, read_parquet(ctx, "dedup", "dedup.parquet"), "dedup")
    ms = ctx.load_json("model_scores", "model_scores.json")
    if ms["enabled"]:
        _join(df, read_parquet(ctx, "model_scores", "model_scores.parquet"), "model_scores")
    div = ctx.load_json("diversity", "diversity.json")
    df.drop(columns=["text"]).to_parquet(ctx.path("scores.parquet"))
    # compute time behind these scores: the input stages' own times (also when they ran in an earlier
    # process) plus this stage's so far; per-stage wall times are in the stage_time table
    elapsed = meta["seconds"] + dedup["seconds"] + ms["seconds"] + div["seconds"] + time.perf_counter() - t0
    log_rows(ctx, df, dedup["removed"], div)
    ctx.log(table="curriculum_runtime", method="score_stage", metric="seconds", value=elapsed, n=len(df),
            params={"mb": float(df["n_bytes"].sum() / 1e6), "metrics_seconds": meta["seconds"]})
    print(f"summary: {len(df)} documents ({df['n_bytes'].sum() / 1e6:.1f} MB) scored in {elapsed:.0f} s "
          f"(metrics {meta['seconds']:.0f} s); duplicates: { {r['method']: r['removed'] for r in dedup['removed']} }; "
          f"{len(ctx.rows)} rows")


def log_rows(ctx: StageContext, df: pd.DataFrame, removed: list[dict], div: dict) -> None:
    """Tables curriculum_scores, curriculum_diversity, curriculum_corr and curriculum_dedup."""
    for (lang, genre), g in df.groupby(["language", "genre"]):
        for m in SUMMARY_METRICS:
            v = g[m].replace([np.inf, -np.inf], np.nan).dropna()
            if len(v):
                for q in (0.1, 0.5, 0.9):
                    ctx.log(table="curriculum_scores", method=m, metric=f"q{int(q * 100)}",
                            value=float(v.quantile(q)), n=len(v), params={"language": lang, "genre": genre})
                ctx.log(table="curriculum_scores", method=m, metric="mean", value=float(v.mean()),
                        stderr=float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None, n=len(v),
                        params={"language": lang, "genre": genre})
    extra_cols = [c for c in EXTRA_METRICS if c in df]
    for (lang, genre), g in df.groupby(["language", "genre"]):
        for m in extra_cols:
            v = g[m].dropna()
            if len(v):
                ctx.log(table="curriculum_scores", method=m, metric="mean", value=float(v.mean()), n=len(v),
                        stderr=float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None,
                        params={"language": lang, "genre": genre})
    for name, r in div["groups"].items():
        lang, corpus = name.split("/")
        ctx.log(table="curriculum_diversity", method="task2vec", metric="div_coeff", value=r["div_coeff"],
                stderr=r["se"] if "se" in r else r["ci95"] / 1.96, n=int(r["n_pairs"]),
                params={"language": lang, "corpus": corpus, "probe": div["probe"],
                        "batch_size": div["batch_size"], "seq_len": div["seq_len"]})
    summary = SUMMARY_METRICS + extra_cols
    corr = df[summary].replace([np.inf, -np.inf], np.nan).corr(method="spearman")
    for a in summary:
        for b in summary:
            if np.isfinite(corr.loc[a, b]):
                ctx.log(table="curriculum_corr", method=a, metric=b, value=float(corr.loc[a, b]),
                        n=int(df[[a, b]].dropna().shape[0]))
    for r in removed:
        ctx.log(table="curriculum_dedup", method=r["method"], metric="removed", value=r["removed"], n=r["n"],
                params={"threshold": r["threshold"]})


# num_proc and threads are resources, not hash keys: changing them reuses the outputs
STAGES = [
    Stage("metrics", stage_metrics, config_keys=("corpus", "n_length_buckets"),
          description="corpus -> per-document model-free metrics"),
    Stage("dedup", stage_dedup, config_keys=("seed", "minhash", "semdedup", "density"), inputs=("metrics",),
          description="MinHash-LSH; SemDeDup, D4 and Density on MiniLM embeddings"),
    Stage("decontam", stage_decontam, config_keys=("decontam",), inputs=("metrics",),
          description="documents sharing a 13-gram with ARC / MMLU, per language x source"),
    Stage("model_scores", stage_model_scores, config_keys=("seed", "model_scores"), inputs=("metrics",),
          description="ASK-LLM and LM perplexity on a seeded sample"),
    Stage("diversity", stage_diversity, config_keys=("seed", "diversity"), inputs=("metrics",),
          description="Task2Vec diversity coefficient per corpus"),
    Stage("summary", stage_summary, inputs=("metrics", "dedup", "model_scores", "diversity"),
          description="scores.parquet and the results-table rows"),
    *STUDY_STAGES,   # part 2: the curriculum training study (exp_curriculum/study_stages.py)
]


def main(argv: list[str] | None = None) -> int:
    return run_experiment(EXP, Config, STAGES, argv=argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())

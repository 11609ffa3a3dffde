"""Figures and report tables of exp_curriculum, drawn from its rows of results.csv (results/make_figures.py
draws them and writes results/REPORT.md)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from common.plotting import register_figure
from common.report import long, pivot, register_table, select

SHOWN = ["char1_bits_per_char", "deflate_bits_per_byte", "deflate_ratio_lennorm", "ttr", "mtld", "hdd", "vocd",
         "fre", "fkgl"]


@register_figure("metric_distributions", experiment="exp_curriculum", sources="curriculum_scores", deck="info_density",
                 title="Information-density metrics per language and genre (median, p10-p90)")
def metric_distributions(df):
    d = df[df["table"] == "curriculum_scores"]
    if d.empty:
        return None
    fig, axes = plt.subplots(3, 3, figsize=(14, 10))
    for ax, m in zip(axes.ravel(), SHOWN):
        g = d[d["method"] == m].pivot_table(index=["p.language", "p.genre"], columns="metric", values="value")
        if g.empty:
            continue
        labels = [f"{lg}/{ge}" for lg, ge in g.index]
        y = np.arange(len(g))
        ax.errorbar(g["q50"], y, xerr=[g["q50"] - g["q10"], g["q90"] - g["q50"]], fmt="o", capsize=3)
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_title(f"{m} (median, p10-p90)", fontsize=9)
    fig.tight_layout()
    return fig


@register_figure("metric_correlations", experiment="exp_curriculum", sources="curriculum_corr", deck="info_density",
                 title="Spearman correlations between the per-document metrics")
def metric_correlations(df):
    d = df[df["table"] == "curriculum_corr"]
    if d.empty:
        return None
    mat = d.pivot_table(index="method", columns="metric", values="value")
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(mat.values, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(mat.columns)), mat.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(mat.index)), mat.index, fontsize=7)
    fig.colorbar(im, ax=ax, label="Spearman correlation (per document)")
    fig.tight_layout()
    return fig


@register_figure("duplicates_per_method", experiment="exp_curriculum", sources="curriculum_dedup", deck="d4",
                 title="Documents removed by MinHash, SemDeDup and D4")
def duplicates_per_method(df):
    d = df[df["table"] == "curriculum_dedup"]
    if d.empty:
        return None
    d = d.sort_values("end_time" if "end_time" in d else "method").groupby("method").last()
    fig, ax = plt.subplots(figsize=(7, 4))
    # MinHash and SemDeDup find duplicates; D4's removals are set by its config (target ratio, keep fraction)
    fixed = [m.startswith("d4") for m in d.index]
    ax.bar(d.index, d["value"], color=["tab:gray" if f else "tab:blue" for f in fixed])
    for i, (v, n, f) in enumerate(zip(d["value"], d["n"], fixed)):
        ax.text(i, v, f"{int(v)} / {int(n)}" + ("\n(set by config)" if f else ""), ha="center", va="bottom",
                fontsize=8)
    ax.set_ylabel("documents removed")
    ax.set_title("Near duplicates found (blue) and D4's configured removals (grey)", fontsize=10)
    fig.tight_layout()
    return fig


@register_figure("model_scores", experiment="exp_curriculum", sources="curriculum_scores", deck="askllm",
                 title="ASK-LLM P(yes) and LM bits per byte under SmolLM2-135M-Instruct")
def model_scores(df):
    d = df[(df["table"] == "curriculum_scores") & df["method"].isin(["askllm", "lm_bits_per_byte"])
           & (df["metric"] == "mean")]
    if d.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, m in zip(axes, ["askllm", "lm_bits_per_byte"]):
        g = d[d["method"] == m].groupby(["p.language", "p.genre"]).last()
        y = np.arange(len(g))
        ax.errorbar(g["value"], y, xerr=1.96 * g["stderr"].fillna(0), fmt="o", capsize=3)
        ax.set_yticks(y, [f"{lg}/{ge} (n={int(n)})" for (lg, ge), n in zip(g.index, g["n"])], fontsize=7)
        ax.set_title({"askllm": "ASK-LLM P(yes), SmolLM2-135M-Instruct",
                      "lm_bits_per_byte": "LM bits per byte, SmolLM2-135M-Instruct"}[m], fontsize=9)
    fig.tight_layout()
    return fig


@register_figure("diversity_coefficient", experiment="exp_curriculum", sources="curriculum_diversity", deck="diversity",
                 title="Diversity coefficient per corpus (published values hatched, context only)")
def diversity_coefficient(df):
    d = df[df["table"] == "curriculum_diversity"]
    if d.empty:
        return None
    from exp_curriculum.diversity import PUBLISHED_DIVERSITY  # here: importing diversity loads torch

    g = d.groupby(["p.language", "p.corpus"]).last()
    labels = [f"{lg}/{c}" for lg, c in g.index]
    fig, ax = plt.subplots(figsize=(9, 5))
    y = np.arange(len(g))
    ax.barh(y, g["value"], xerr=1.96 * g["stderr"].fillna(0), label="local (SmolLM2 probe, small batches)")
    pub = list(PUBLISHED_DIVERSITY.items())
    yp = np.arange(len(g), len(g) + len(pub))
    ax.barh(yp, [v for _, v in pub], hatch="//", color="lightgrey", edgecolor="grey",
            label="published (GPT-2 probe, 512 x 128 tokens; context only)")
    ax.set_yticks(np.concatenate([y, yp]), labels + [f"published: {k}" for k, _ in pub], fontsize=7)
    ax.set_xlabel("diversity coefficient (mean Task2Vec cosine distance)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- report tables
EXP = "exp_curriculum"
# model-free metrics in the deck's order: entropy, compression, lexical diversity, readability
DENSITY_METRICS = ["char1_bits_per_char", "char1_mm_bits_per_char", "char3_bits_per_char", "word1_bits_per_token",
                   "deflate_bits_per_byte", "deflate_ratio_lennorm", "zstd_bits_per_byte", "lzma_bits_per_byte",
                   "ttr", "root_ttr", "mtld", "hdd", "vocd", "fre", "fkgl"]
MODEL_SCORES = ["askllm", "lm_bits_per_byte", "density"]


@register_table("info_density", EXP, "Information-density metrics: median per language and genre",
                sources="curriculum_scores", deck="info_density",
                note="Per-document metrics over the offline EN/FR corpora; quantiles and means per group are "
                     "in results.csv and the figure.")
def table_info_density(rows):
    t = select(rows, "curriculum_scores", metric="q50", method=DENSITY_METRICS, needs=("p.language", "p.genre"))
    if t.empty:
        return None
    w = pivot(t, index=["method"], columns=["p.language", "p.genre"])
    w = w.sort_values("method", key=lambda m: m.map(DENSITY_METRICS.index))
    return w.rename(columns={"method": "metric"}), t


@register_table("model_scores", EXP, "Model-based scores per group: ASK-LLM P(yes), LM bits per byte, density",
                sources="curriculum_scores", deck=("askllm", "density"),
                note="Mean ± SE over the scored documents of each group (n), SmolLM2-135M-Instruct as the scorer.")
def table_model_scores(rows):
    t = select(rows, "curriculum_scores", metric="mean", method=MODEL_SCORES, needs=("p.language", "p.genre"))
    if t.empty:
        return None
    t = t.assign(_rank=t["method"].map(MODEL_SCORES.index)).sort_values(["_rank", "p.language", "p.genre"])
    return long(t, {"score": "method", "language": "p.language", "genre": "p.genre"}, value="mean", n=True), t


@register_table("diversity", EXP, "Diversity coefficient per corpus (local probe, not comparable with published ones)",
                sources="curriculum_diversity", deck="diversity",
                note="Mean Task2Vec cosine distance ± SE over batch pairs (n); quick profile: small batches.")
def table_diversity(rows):
    t = select(rows, "curriculum_diversity", needs=("p.language", "p.corpus"))
    if t.empty:
        return None
    t = t.sort_values(["p.language", "p.corpus"])
    return long(t, {"language": "p.language", "corpus": "p.corpus", "probe": "p.probe",
                    "batch size": "p.batch_size", "tokens per sequence": "p.seq_len"},
                value="diversity coefficient", n=True)


@register_table("dedup", EXP, "Near-duplicate removal: MinHash-LSH, SemDeDup, D4 (documents removed of n)",
                sources="curriculum_dedup", deck="d4")
def table_dedup(rows):
    t = select(rows, "curriculum_dedup")
    if t.empty:
        return None
    return long(t, {"method": "method", "threshold": "p.threshold"}, value="removed", n=True)


@register_table("bench", EXP, "Metric and MinHash speed: ours vs the reference packages (documents/s)",
                sources="curriculum_bench", note="One row per benchmark run; speed-up as the benchmark logged it.")
def table_bench(rows):
    t = select(rows, "curriculum_bench", needs=("p.task",))
    if t.empty:
        return None
    t = t.assign(run=t["run_id"].map(lambda r: f"`{r}`"))
    w = pivot(t, index=["p.task", "run"], columns="method", order=["ours", "reference"])
    speed = t.drop_duplicates(["p.task", "run"]).set_index(["p.task", "run"])["p.speedup"] if "p.speedup" in t else None
    if speed is not None:
        w["speed-up"] = [speed.get((a, b)) for a, b in zip(w["p.task"], w["run"])]
    return w.rename(columns={"p.task": "task", "ours": "ours (docs/s)", "reference": "reference (docs/s)"})


@register_table("runtime", EXP, "Score stage wall time", sources="curriculum_runtime")
def table_runtime(rows):
    t = select(rows, "curriculum_runtime")
    if t.empty:
        return None
    return long(t, {"stage": "method", "corpus (MB)": "p.mb", "model-free metrics (s)": "p.metrics_seconds"},
                value="seconds", n=True)


# part 2 (the training study): its figures and tables register on import
from exp_curriculum import figures_study  # noqa: E402,F401

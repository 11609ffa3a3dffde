"""Figures of exp_curriculum, drawn from its rows of results.csv."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from common.plotting import register_figure
from exp_curriculum.diversity import PUBLISHED_DIVERSITY

SHOWN = ["char1_bits_per_char", "deflate_bits_per_byte", "deflate_ratio_lennorm", "ttr", "mtld", "hdd", "vocd",
         "fre", "fkgl"]


@register_figure("metric_distributions", experiment="exp_curriculum")
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


@register_figure("metric_correlations", experiment="exp_curriculum")
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


@register_figure("duplicates_per_method", experiment="exp_curriculum")
def duplicates_per_method(df):
    d = df[df["table"] == "curriculum_dedup"]
    if d.empty:
        return None
    d = d.sort_values("end_time" if "end_time" in d else "method").groupby("method").last()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(d.index, d["value"])
    for i, (v, n) in enumerate(zip(d["value"], d["n"])):
        ax.text(i, v, f"{int(v)} / {int(n)}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("documents removed")
    fig.tight_layout()
    return fig


@register_figure("model_scores", experiment="exp_curriculum")
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


@register_figure("diversity_coefficient", experiment="exp_curriculum")
def diversity_coefficient(df):
    d = df[df["table"] == "curriculum_diversity"]
    if d.empty:
        return None
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

"""Report tables and the harmonic-mean figure of exp_plpp, drawn from its rows of results.csv
(results/make_figures.py writes them into results/REPORT.md). Tables only show logged rows."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from common.plotting import register_figure
from common.report import PM, pivot, register_table, select

EXP = "exp_plpp"
METHOD_ORDER = ["zeroshot", "coop", "coop_plpp", "kgcoop", "kgcoop_plpp", "cocoop", "cocoop_plpp"]


def _order(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _summary(rows: pd.DataFrame, setting: str) -> pd.DataFrame:
    s = select(rows, "plpp_summary", needs=("p.setting", "p.dataset"))
    return s[s["p.setting"] == setting] if not s.empty else s


def _mean_cells(s: pd.DataFrame, metrics: list[str], index: list[str]) -> pd.DataFrame | None:
    """One row per index value and method: ``metric`` = mean ± standard error (n seeds)."""
    means = s[s["metric"].isin([f"{m}_mean" for m in metrics]) & ~s["method"].str.contains("-", regex=False)]
    if means.empty:
        return None
    out = []
    for key, g in means.groupby([*index, "method"], dropna=False):
        cells = dict(zip([*(c.removeprefix("p.") for c in index), "method"], key))
        for m in metrics:
            r = g[g["metric"] == f"{m}_mean"]
            if len(r):
                cells[m] = PM(r["value"].iloc[0], r["stderr"].iloc[0])
                cells["seeds"] = int(r["n"].iloc[0])
        out.append(cells)
    frame = pd.DataFrame(out)
    frame["_o"] = frame["method"].map(_order)
    return frame.sort_values([*(c.removeprefix("p.") for c in index), "_o"]).drop(columns="_o").reset_index(drop=True)


def _diff_cells(s: pd.DataFrame, metrics: list[str], index: list[str]) -> pd.DataFrame | None:
    d = s[s["method"].str.contains("-", regex=False)]
    if d.empty:
        return None
    out = []
    for key, g in d.groupby([*index, "method"], dropna=False):
        cells = dict(zip([*(c.removeprefix("p.") for c in index), "difference"], key))
        for m in metrics:
            got = {r["metric"]: r for _, r in g.iterrows()}
            if f"{m}_diff_mean" in got:
                cells[f"{m} mean"] = got[f"{m}_diff_mean"]["value"]
                cells[f"{m} ci95 low"] = got[f"{m}_diff_ci95_low"]["value"]
                cells[f"{m} ci95 high"] = got[f"{m}_diff_ci95_high"]["value"]
                cells["seeds"] = int(got[f"{m}_diff_mean"]["n"])
        out.append(cells)
    return pd.DataFrame(out).reset_index(drop=True)


@register_table("plpp_zeroshot", EXP, "Offline CLIP: zero-shot accuracy per downstream dataset (all / base = "
                "pretraining combinations / novel = held-out combinations) next to chance",
                note="Hand prompt 'a photo of a {}.'; test images of the fixed split. Novel classes are colour x "
                     "object pairs the CLIP never saw paired in pretraining.")
def table_zeroshot(rows):
    t = select(rows, "plpp_zeroshot", needs=("p.dataset", "p.classes", "p.chance"))
    if t.empty:
        return None
    out = t.pivot_table(index="p.dataset", columns="p.classes", values="value").reset_index()
    chance = t.pivot_table(index="p.dataset", columns="p.classes", values="p.chance").add_prefix("chance ")
    out = out.merge(chance.reset_index(), on="p.dataset").rename(columns={"p.dataset": "dataset"})
    cols = ["dataset", *[c for c in ("all", "base", "novel") if c in out], *[f"chance {c}" for c in
                                                                              ("all", "base", "novel")]]
    return out[[c for c in cols if c in out]]


@register_table("plpp_tune", EXP, "PLPP's weights chosen on the validation split (stage tune): base-class "
                "validation accuracy per candidate, mean over seeds",
                note="Each candidate overrides the plpp section (default = as written); trained on the base classes' "
                     "16 shots, scored on the base classes' validation images. chosen = the candidate that base2novel, "
                     "fewshot, transfer and the ablations use for that dataset and method.")
def table_tune(rows):
    t = select(rows, "plpp_tune_choice", needs=("p.dataset", "p.candidate"))
    if t.empty:
        return None
    out = pivot(t, ["p.dataset", "method", "p.candidate"])
    out["chosen"] = out["chosen"].map({1.0: "yes", 0.0: ""})
    out = out.rename(columns={"p.dataset": "dataset", "p.candidate": "candidate", "val_acc_mean": "val acc"})
    return out[["dataset", "method", "candidate", "val acc", "chosen"]]


@register_table("plpp_b2n", EXP, "Base-to-novel generalisation (16 shots of the base classes): base, novel, "
                "harmonic mean", sources=("plpp_summary",),
                note="Mean ± standard error over seeds (t-intervals in results.csv). The CoOp/CoCoOp papers' "
                     "layout on the offline testbed.")
def table_b2n(rows):
    return _mean_cells(_summary(rows, "b2n"), ["base", "novel", "hm"], ["p.dataset"])


@register_table("plpp_b2n_diffs", EXP, "Base-to-novel: PLPP minus the method it plugs into, paired by seed",
                sources=("plpp_summary",),
                note="Same seed = same few-shot images and context initialisation; ci95 = the t-interval over seeds.")
def table_b2n_diffs(rows):
    return _diff_cells(_summary(rows, "b2n"), ["base", "novel", "hm"], ["p.dataset"])


@register_table("plpp_fewshot", EXP, "Few-shot classification (all classes): accuracy vs shots",
                sources=("plpp_summary",), note="Mean ± standard error over seeds; paired PLPP differences below.")
def table_fewshot(rows):
    return _mean_cells(_summary(rows, "fewshot"), ["acc"], ["p.dataset", "p.shots"])


@register_table("plpp_fewshot_diffs", EXP, "Few-shot: PLPP minus CoOp, paired by seed", sources=("plpp_summary",))
def table_fewshot_diffs(rows):
    return _diff_cells(_summary(rows, "fewshot"), ["acc"], ["p.dataset", "p.shots"])


@register_table("plpp_transfer", EXP, "Cross-dataset (xd) and domain generalisation (dg): the source's 16-shot "
                "prompts on other datasets / shifted digits", sources=("plpp_summary",),
                note="source = the training dataset itself; xd targets have other classes (the learned context is "
                     "kept, the class names change); dg targets have the source's classes.")
def table_transfer(rows):
    frames = [f.assign(setting=k) for k in ("source", "xd", "dg")
              if (f := _mean_cells(_summary(rows, k), ["acc"], ["p.dataset"])) is not None]
    if not frames:
        return None
    out = pd.concat(frames).rename(columns={"dataset": "target"})
    return out[["setting", "target", "method", "acc", "seeds"]].reset_index(drop=True)


@register_table("plpp_transfer_diffs", EXP, "Cross-dataset and DG: PLPP minus CoOp, paired by seed",
                sources=("plpp_summary",))
def table_transfer_diffs(rows):
    frames = [f.assign(setting=k) for k in ("source", "xd", "dg")
              if (f := _diff_cells(_summary(rows, k), ["acc"], ["p.dataset"])) is not None]
    return pd.concat(frames).reset_index(drop=True) if frames else None


@register_table("plpp_bench", EXP, "PLPP's cost: one prompt-learning step vs a CoOp step (same backbone, "
                "classes, batch), time and peak memory",
                note="From the latest bench run. coop_plpp = top-k student; _fullvocab = student over the whole "
                     "vocabulary. ratio_vs_coop = median over interleaved timing rounds of the within-round ratio "
                     "(low / high: its range over rounds); seconds_per_step = the fastest round. Memory = rise of "
                     "the process's resident high-water mark (CPU), each method alone in a process.")
def table_bench(rows):
    t = select(rows, "plpp_bench", needs=("p.backbone", "p.n_classes"))
    if t.empty:
        return None
    t = t[t["run_id"] == t.sort_values("end_time")["run_id"].iloc[-1]]
    out = t.pivot_table(index=["p.backbone", "p.n_classes", "method"], columns="metric", values="value")
    return out.reset_index().rename(columns={"p.backbone": "backbone", "p.n_classes": "classes"})


@register_figure("plpp_hm", EXP, sources=("plpp_summary",))
def figure_hm(rows):
    """Base-to-novel harmonic mean per method and dataset (mean and t-interval over seeds)."""
    s = _summary(rows, "b2n")
    if s.empty:
        return None
    s = s[~s["method"].str.contains("-", regex=False)]
    datasets = sorted(s["p.dataset"].unique())
    methods = sorted(s["method"].unique(), key=_order)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(datasets), 3.2))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        for j, d in enumerate(datasets):
            g = s[(s["method"] == m) & (s["p.dataset"] == d)].set_index("metric")["value"]
            if "hm_mean" not in g:
                continue
            x = j + (i - (len(methods) - 1) / 2) * width
            err = [[g["hm_mean"] - g["hm_ci95_low"]], [g["hm_ci95_high"] - g["hm_mean"]]]
            ax.bar(x, g["hm_mean"], width, yerr=err, capsize=2, color=f"C{i}", label=m if j == 0 else None)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("harmonic mean of base / novel accuracy")
    ax.legend(ncol=2)
    return fig

"""Report tables and the figure of exp_distill_data, drawn from its rows of results.csv (results/make_figures.py
writes them into results/REPORT.md): the paper-layout table (method x budget per setting, ARC-Easy / MMLU),
the paired differences, and accuracy vs budget per method."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from common.plotting import register_figure
from common.report import PM, register_table, select

EXP = "exp_distill_data"
TASKS = {"arc_easy": "ARC-Easy", "mmlu@0shot": "MMLU 0-shot", "mmlu@5shot": "MMLU 5-shot"}
METHOD_ORDER = ["base", "full", "random", "less"]


def _summary(rows: pd.DataFrame) -> pd.DataFrame:
    return select(rows, "distill_summary", needs=("p.setting", "p.budget", "p.task"))


def _base(rows: pd.DataFrame) -> pd.DataFrame:
    """The base model's rows of distill_main with the summary's task names (mmlu -> mmlu@<k>shot)."""
    t = select(rows, "distill_main", method="base", needs=("p.setting", "p.task", "p.num_fewshot"))
    if t.empty:
        return t
    task = [tk if tk.startswith("arc") else f"{tk}@{int(k)}shot" for tk, k in zip(t["p.task"], t["p.num_fewshot"])]
    return t.assign(**{"p.task": task})


@register_table("distill_main", EXP, "Fine-tuning on full / random / LESS-selected data: accuracy per setting",
                sources=("distill_summary", "distill_main"),
                note="Mean ± standard error over seeds (n = seeds; t-intervals are in results.csv) for the "
                     "fine-tuned models; the base row is the model before fine-tuning, ± lm-eval's question-level "
                     "standard error. acc / acc_norm as lm-eval defines them.")
def table_main(rows):
    s = _summary(rows)
    if s.empty:
        return None
    out = []
    means = s[s["metric"].isin(["acc_mean", "acc_norm_mean"]) & s["method"].isin(METHOD_ORDER)]
    base = _base(rows)
    for setting in sorted(means["p.setting"].unique()):
        b = base[base["p.setting"] == setting]
        if not b.empty:
            cells = {"setting": setting, "method": "base", "budget": 0, "seeds": ""}
            for task, label in TASKS.items():
                for m in ("acc", "acc_norm"):
                    r = b[(b["p.task"] == task) & (b["metric"] == m)]
                    if len(r):
                        cells[f"{label} {m}"] = PM(r["value"].iloc[0], r["stderr"].iloc[0])
            out.append(cells)
        g = means[means["p.setting"] == setting]
        for (method, budget), h in sorted(g.groupby(["method", "p.budget"]),
                                          key=lambda kv: (METHOD_ORDER.index(kv[0][0]), kv[0][1])):
            cells = {"setting": setting, "method": method, "budget": int(budget), "seeds": int(h["n"].max())}
            for task, label in TASKS.items():
                for m in ("acc", "acc_norm"):
                    r = h[(h["p.task"] == task) & (h["metric"] == f"{m}_mean")]
                    if len(r):
                        cells[f"{label} {m}"] = PM(r["value"].iloc[0], r["stderr"].iloc[0])
            out.append(cells)
    return pd.DataFrame(out)


@register_table("distill_diffs", EXP, "Paired differences: LESS − random (same seed and budget), full − base",
                sources="distill_summary",
                note="Mean difference of accuracy with its t-interval over seeds (CI low / high; degenerate for "
                     "one seed). full − base also against question sampling: z = the difference over the unpaired "
                     "standard error of the two accuracies (conservative; resolved when z is at least two).")
def table_diffs(rows):
    s = _summary(rows)
    d = s[s["method"].isin(["less-random", "full-base"]) & s["p.task"].isin(list(TASKS))]
    if d.empty:
        return None
    out = []
    for (setting, method, budget, task), h in d.groupby(["p.setting", "method", "p.budget", "p.task"]):
        for m in ("acc", "acc_norm"):
            v = {k: h.loc[h["metric"] == f"{m}_diff_{k}", "value"] for k in ("mean", "ci95_low", "ci95_high")}
            if not len(v["mean"]):
                continue
            n = int(h.loc[h["metric"] == f"{m}_diff_mean", "n"].iloc[0])
            z = h.loc[h["metric"] == f"{m}_diff_z", "value"]
            out.append({"setting": setting, "difference": method, "budget": int(budget), "task": TASKS[task],
                        "metric": m, "mean": v["mean"].iloc[0], "CI low": v["ci95_low"].iloc[0],
                        "CI high": v["ci95_high"].iloc[0], "seeds": n,
                        "z vs question sampling": z.iloc[0] if len(z) else "—"})
    return pd.DataFrame(out)


@register_figure("accuracy_vs_budget", experiment=EXP, sources=("distill_summary", "distill_main"),
                 title="Accuracy vs number of training examples per method (mean and t-interval over seeds; "
                       "dashed: the base model)")
def accuracy_vs_budget(df):
    s = _summary(df)
    if s.empty:
        return None
    settings = sorted(s["p.setting"].unique())
    tasks = [t for t in TASKS if (s["p.task"] == t).any()]
    base = _base(df)
    fig, axes = plt.subplots(len(settings), len(tasks), figsize=(4.5 * len(tasks), 3.4 * len(settings)),
                             squeeze=False)
    for i, setting in enumerate(settings):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            g = s[(s["p.setting"] == setting) & (s["p.task"] == task)]
            for method in ("full", "random", "less"):
                h = g[g["method"] == method]
                w = h.pivot_table(index="p.budget", columns="metric", values="value")
                if "acc_mean" not in w:
                    continue
                w = w.sort_index()
                err = [w["acc_mean"] - w["acc_ci95_low"], w["acc_ci95_high"] - w["acc_mean"]]
                ax.errorbar(w.index, w["acc_mean"], yerr=err, marker="o", capsize=3, label=method)
            b = base[(base["p.setting"] == setting) & (base["p.task"] == task) & (base["metric"] == "acc")]
            if len(b):
                ax.axhline(b["value"].iloc[0], ls="--", color="grey", label="base")
            ax.set_xscale("log")
            ax.set_xlabel("training examples")
            ax.set_ylabel("acc")
            ax.set_title(f"{setting}\n{TASKS[task]}", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

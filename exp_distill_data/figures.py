"""Report tables and the figure of exp_distill_data, drawn from its rows of results.csv (results/make_figures.py
writes them into results/REPORT.md): the paper-layout table (method x budget per setting, ARC-Easy / MMLU),
the paired differences, and accuracy vs budget per method."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd

from common.plotting import register_figure
from common.report import PM, register_table, select

EXP = "exp_distill_data"
TASKS = {"arc_easy": "ARC-Easy", "mmlu@0shot": "MMLU 0-shot", "mmlu@5shot": "MMLU 5-shot"}
METHOD_ORDER = ["base", "full", "random", "less", "ours", "ours_noreg", "ours_emb", "ours_noreg_emb"]


def _order(method: str) -> tuple[int, str]:
    # ablations ("ours[syn_steps=4]") after the main methods, alphabetically
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _summary(rows: pd.DataFrame) -> pd.DataFrame:
    return select(rows, "distill_summary", needs=("p.setting", "p.budget", "p.task"))


def _base(rows: pd.DataFrame) -> pd.DataFrame:
    """The base model's rows of distill_main with the summary's task names (mmlu -> mmlu@<k>shot)."""
    t = select(rows, "distill_main", method="base", needs=("p.setting", "p.task", "p.num_fewshot"))
    if t.empty:
        return t
    task = [tk if tk.startswith("arc") else f"{tk}@{int(k)}shot" for tk, k in zip(t["p.task"], t["p.num_fewshot"])]
    return t.assign(**{"p.task": task})


@register_table("distill_main", EXP, "Fine-tuning on full / random / LESS-selected / distilled data: accuracy per "
                "setting", sources=("distill_summary", "distill_main"),
                note="Mean ± standard error over seeds (n = seeds; t-intervals are in results.csv) for the "
                     "fine-tuned models; the base row is the model before fine-tuning, ± lm-eval's question-level "
                     "standard error. acc / acc_norm as lm-eval defines them. ours = trajectory matching with the "
                     "neighbour regulariser, projected to tokens; ours_noreg = without it; *_emb = the distiller "
                     "trained on the continuous embeddings (no projection); ours[...] = one-seed ablations.")
def table_main(rows):
    s = _summary(rows)
    if s.empty:
        return None
    out = []
    means = s[s["metric"].isin(["acc_mean", "acc_norm_mean"]) & ~s["method"].str.contains("-", regex=False)]
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
                                          key=lambda kv: (_order(kv[0][0]), kv[0][1])):
            cells = {"setting": setting, "method": method, "budget": int(budget), "seeds": int(h["n"].max())}
            for task, label in TASKS.items():
                for m in ("acc", "acc_norm"):
                    r = h[(h["p.task"] == task) & (h["metric"] == f"{m}_mean")]
                    if len(r):
                        cells[f"{label} {m}"] = PM(r["value"].iloc[0], r["stderr"].iloc[0])
            out.append(cells)
    return pd.DataFrame(out)


@register_table("distill_diffs", EXP, "Paired differences (same seed and budget): LESS − random, ours − LESS, "
                "ours − random, ours − ours_noreg, …; full − base", sources="distill_summary",
                note="Mean difference of accuracy with its t-interval over seeds (CI low / high; degenerate for "
                     "one seed). full − base also against question sampling: z = the difference over the unpaired "
                     "standard error of the two accuracies (conservative; resolved when z is at least two).")
def table_diffs(rows):
    s = _summary(rows)
    d = s[s["method"].str.contains("-", regex=False) & s["p.task"].isin(list(TASKS))]
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
            for method in ("full", "random", "less", "ours", "ours_noreg"):
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
            budgets = sorted(g["p.budget"].dropna().unique())
            ax.set_xticks(budgets, [f"{int(b)}" for b in budgets])   # the budgets themselves, no 2x10^1 labels
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set_xlabel("training examples")
            ax.set_ylabel("acc")
            ax.set_title(f"{setting}\n{TASKS[task]}", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _per_method(t: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per synthetic set (distiller, method, budget, seed): the rows as logged, never averaged here."""
    if t.empty:
        return t
    keys = ["p.distiller", "method", "p.budget", "p.seed"]
    out = t[t["metric"].isin(metrics)].pivot_table(index=keys, columns="metric", values="value").reset_index()
    out = out.rename(columns={"p.distiller": "distiller", "p.budget": "budget", "p.seed": "seed"})
    out = out.sort_values(["distiller", "method", "budget", "seed"], key=lambda c: c.map(str))
    return out[["distiller", "method", "budget", "seed", *[m for m in metrics if m in out]]].reset_index(drop=True)


@register_table("distill_match", EXP, "Trajectory matching: the normalised matching loss at the first and last "
                "outer iterations, the learnt inner rate, time per synthetic set",
                note="One row per synthetic set. matching = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² at a random expert "
                     "start (1 = no better than staying at the start); first10 / last10 = mean of the first / last ten "
                     "iterations (each iteration draws its own start, so one iteration alone is one draw).")
def table_match(rows):
    t = select(rows, "distill_match", needs=("p.distiller", "p.budget", "p.seed"))
    return _per_method(t, ["matching_first", "matching_first10_mean", "matching_last10_mean", "inner_lr", "seconds",
                           "skipped_starts"])


@register_table("distill_projection", EXP, "Projection to tokens: distance of the learnt prompt vectors to their "
                "nearest token, positions whose nearest token changed, prompts unchanged",
                note="One row per synthetic set. Distances in the projection metric (L2 unless the ablation says "
                     "cosine); "
                     "before = the initial vectors (0 for a real-data start). retokenise_exact = decoded text "
                     "that the distiller's tokenizer encodes back to the same ids. Read the sets themselves in "
                     "the project stage's inspection.md.")
def table_projection(rows):
    t = select(rows, "distill_projection", needs=("p.distiller", "p.budget", "p.seed"))
    return _per_method(t, ["nn_distance_before_mean", "nn_distance_after_mean", "changed_fraction",
                           "prompt_unchanged_fraction", "retokenise_exact_fraction"])


COST_STAGES = {"less_warmup": "LESS selection", "less_features": "LESS selection", "less_select": "LESS selection",
               "experts": "distillation", "distill": "distillation", "project": "distillation",
               "train": "fine-tuning (every baseline run)", "students": "fine-tuning (every student)"}


@register_table("distill_cost", EXP, "Cost per stage of the committed small profile: LESS's selection, "
                "distillation (experts + trajectory matching + projection), fine-tuning; and per run: one full-data "
                "fine-tune, one distilled set, one fine-tune on a selected or distilled subset",
                sources="stage_time",
                note="Wall seconds in the run that computed each stage (the threads of the run's config; the device "
                     "column of results.csv names the CPU); peak RSS = the main process's resident high-water mark "
                     "during the stage (or the distillation job), where the run logged it. Per-run lines: the slowest "
                     "run and the highest peak among the runs of that kind in the latest small run that logged that "
                     "kind (distill_run_time rows).")
def table_cost(rows):
    t = select(rows, "stage_time")
    if t.empty or "profile" not in t:
        return None
    t = t[(t["experiment"] == EXP) & (t["profile"] == "small") & t["method"].isin(list(COST_STAGES))]
    if t.empty:
        return None
    secs = t[t["metric"] == "seconds"].sort_values("end_time").groupby("method").tail(1)   # latest run per stage
    peak = t[t["metric"] == "peak_rss_mib"].set_index(["run_id", "method"])["value"]
    out = pd.DataFrame({"item": secs["method"], "part of": secs["method"].map(COST_STAGES),
                        "wall seconds": secs["value"],
                        "peak RSS MiB": [peak.get((r, m)) for r, m in zip(secs["run_id"], secs["method"])],
                        "runs": 1, "run": secs["run_id"]})
    out = pd.concat([out.sort_values(["part of", "item"]), _per_run_cost(rows)], ignore_index=True)
    return out.reset_index(drop=True)


def _per_run_cost(rows) -> pd.DataFrame:
    """One line per kind of run (stage, method, model), from the latest small run that logged that kind."""
    t = select(rows, "distill_run_time", needs=("p.stage",))
    if t.empty or "profile" not in t:
        return pd.DataFrame()
    t = t[t["profile"] == "small"]
    if t.empty:
        return pd.DataFrame()
    t = t[~t["method"].str.contains("[", regex=False)].copy()   # the ablations' sets cost as "ours" does
    model = t["p.trainer"] if "p.trainer" in t else pd.Series("", index=t.index)
    if "p.distiller" in t:
        model = model.fillna(t["p.distiller"])
    t["model"] = model.fillna("")
    t["kind"] = t["p.stage"] + ": " + t["method"].map(lambda m: "full-data fine-tune" if m == "full" else m)
    out = []
    for (kind, m), g in t.groupby(["kind", "model"], sort=True):
        g = g[g["run_id"] == g.sort_values("end_time")["run_id"].iloc[-1]]   # the latest run that ran this kind
        s, pk = g[g["metric"] == "seconds"]["value"], g[g["metric"] == "peak_rss_mib"]["value"]
        n = max(len(s), len(pk))
        out.append({"item": f"{kind} ({m}), one run", "part of": "per run",
                    "wall seconds": s.max() if len(s) else None,
                    "peak RSS MiB": pk.max() if len(pk) else None, "runs": n,
                    "run": g["run_id"].iloc[0]})
    return pd.DataFrame(out)


@register_table("distill_bench_tm", EXP, "Trajectory matching: one outer iteration vs N ordinary fine-tuning steps "
                "of the same batch, time and peak memory vs N, with and without checkpointing of the inner steps",
                note="From the latest bench_distill run per model and machine (its parameters are in results.csv: "
                     "model, batch, length, threads). tm = unrolled steps kept in memory; tm_ckpt = each step "
                     "recomputed in backward. "
                     "peak_rss_delta_mib = rise of the process's resident high-water mark during the iteration (CPU); "
                     "peak_cuda_mib = torch.cuda.max_memory_allocated during it (GPU).")
def table_bench_tm(rows):
    t = select(rows, "distill_bench_tm", needs=("p.N", "p.model"))
    if t.empty:
        return None
    latest = t.sort_values("end_time").groupby(["p.model", "device"])["run_id"].last()   # per model and machine
    t = t[t["run_id"].isin(latest.values)]
    out = t.pivot_table(index=["device", "p.model", "p.N", "method"], columns="metric", values="value").reset_index()
    return out.rename(columns={"p.model": "model", "p.N": "N"}).sort_values(["device", "model", "N", "method"]) \
        .reset_index(drop=True)

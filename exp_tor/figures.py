"""Figures and report tables of the TOR experiment, drawn from the results table (registered for
results/make_figures.py, which also writes results/REPORT.md)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from common.plotting import register_figure, style
from common.report import long, pivot, register_table, select

EXP = "exp_tor"


def _rows(df, table, *cols: str):
    """The rows of one table, or an empty frame when the table or a needed column is absent."""
    if "table" not in df or any(c not in df for c in cols):
        return df.iloc[0:0]
    return df[df["table"] == table]


@register_figure("tor_vs_interval", experiment=EXP, sources="tor_vs_interval",
                 title="TOR vs checkpoint interval (closed forms)")
def tor_vs_interval(df):
    d = _rows(df, "tor_vs_interval", "p.mtbf", "p.tau")
    if d.empty:
        return None
    style()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (m, gm) in enumerate(d.groupby("p.mtbf")):
        for form, g in gm.groupby("method"):
            g = g.sort_values("p.tau")
            kind = f" {g['p.mtbf_kind'].iloc[0]}" if "p.mtbf_kind" in g and isinstance(g["p.mtbf_kind"].iloc[0], str) \
                else ""
            ax.plot(g["p.tau"], g["value"], color=f"C{i}", ls="-" if form == "exact" else "--",
                    label=f"M = {m:g} min{kind}" if form == "exact" else None)
    delta, repair = float(d["p.delta"].iloc[0]), float(d["p.repair"].iloc[0])
    ax.set(xscale="log", xlabel="checkpoint interval τ (min)", ylabel="TOR", ylim=(0, 1),
           title=f"TOR vs checkpoint interval (δ = {delta:g} min, R = {repair:g} min; dashed: first order)")
    ax.legend()
    return fig


@register_figure("tor_vs_cluster", experiment=EXP, sources="tor_vs_cluster",
                 title="TOR vs cluster size at the Daly interval")
def tor_vs_cluster(df):
    d = _rows(df, "tor_vs_cluster", "p.gpus")
    if d.empty:
        return None
    d = d.sort_values("p.gpus")
    style()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(d["p.gpus"], d["value"], marker="o")
    ax.set(xscale="log", xlabel="GPUs", ylabel="TOR at Daly interval",
           title="TOR vs cluster size (Meta RSC-1 failure rate)")
    return fig


@register_figure("sim_vs_closed", experiment=EXP, sources="tor_validation",
                 title="Simulator vs exact closed form")
def sim_vs_closed(df):
    d = _rows(df, "tor_validation", "p.tau", "p.mtbf", "p.variant")
    if d.empty:
        return None
    key = ["p.tau", "p.mtbf", "p.variant"]
    s = d[(d["method"] == "simulator") & (d["metric"] == "tor")].set_index(key)
    c = d[d["method"] == "closed_exact"].set_index(key)
    j = s.join(c["value"].rename("closed"), how="inner")
    style()
    fig, ax = plt.subplots(figsize=(4, 4))
    for v, g in j.groupby(level="p.variant"):
        ax.errorbar(g["closed"], g["value"], yerr=3 * g["stderr"], fmt="o", ms=3, label=v)
    lo, hi = float(j["closed"].min()), float(j["closed"].max())
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set(xlabel="closed-form TOR (exact)", ylabel="Monte Carlo TOR (±3 SE)", title="Simulator vs closed form")
    ax.legend()
    return fig


@register_figure("harness_rt", experiment=EXP, sources="harness_rt",
                 title="Harness validation job: r(t) timeline")
def harness_rt(df):
    d = _rows(df, "harness_rt", "p.t")
    if d.empty:
        return None
    d = d.sort_values("p.t")
    style()
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.step(d["p.t"], d["value"], where="post", label="r(t)")
    # failures, checkpoints and slow windows where the rows carry them (p.event rows: fault / checkpoint / slow)
    ev = _rows(df, "harness_events", "p.event", "p.t")
    for kind, style_kw in (("fault", {"color": "C3", "ls": "-"}), ("checkpoint", {"color": "0.6", "ls": ":"})):
        for i, t in enumerate(ev[ev["p.event"] == kind]["p.t"]):
            ax.axvline(float(t), lw=0.8, label=kind if i == 0 else None, **style_kw)
    slow = ev[ev["p.event"] == "slow"]
    for i, (_, w) in enumerate(slow.iterrows()):
        ax.axvspan(float(w["p.t"]), float(w["p.t"]) + float(w["value"]), color="C1", alpha=0.25,
                   label="fail-slow window" if i == 0 else None)
    ax.set(xlabel="job time (s)", ylabel="r(t)", ylim=(-0.05, 1.05),
           title="r(t) of the harness validation job (fail-stop + fail-slow, cold restarts)")
    ax.legend(fontsize=7, loc="lower right")
    return fig


@register_figure("tor_vs_ettr", experiment=EXP, sources="tor_vs_ettr",
                 title="TOR vs Meta's ETTR on the same inputs, by failure rate")
def tor_vs_ettr(df):
    d = _rows(df, "tor_vs_ettr", "p.gpus", "p.rate_scenario")
    if d.empty:
        return None
    style()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, (name, g) in enumerate(d.groupby("p.rate_scenario")):
        for method, ls in (("tor_exact", "-"), ("ettr", "--")):
            h = g[g["method"] == method].sort_values("p.gpus")
            ax.plot(h["p.gpus"], h["value"], color=f"C{i}", ls=ls, marker="o", ms=3,
                    label=f"{name} ({float(h['p.failures_per_1000_node_days'].iloc[0]):.3g}/1000 node-days)"
                    if method == "tor_exact" else None)
    ax.set(xscale="log", xlabel="GPUs", ylabel="TOR (solid) / ETTR (dashed)", ylim=(0, 1),
           title="TOR (exact) vs Meta's ETTR at the Daly interval")
    ax.legend(fontsize=6)
    return fig


@register_figure("harness_interval_sweep", experiment=EXP,
                 sources=("harness_interval_sweep", "harness_interval_optimum"),
                 title="Real fault-injected runs: TOR vs checkpoint interval")
def harness_interval_sweep(df):
    d = _rows(df, "harness_interval_sweep", "p.checkpoint_every")
    if d.empty:
        return None
    d = d[(d["metric"] == "tor") & d["method"].isin(["observed", "closed_form", "predicted_pooled"])]
    style()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, g in d.groupby("method"):
        g = g.groupby("p.checkpoint_every")["value"].agg(["mean", "std", "count"]).sort_index()
        err = (g["std"] / g["count"] ** 0.5).fillna(0) if method == "observed" else None
        ls = {"observed": "-", "closed_form": "--"}.get(method, ":")
        label = {"closed_form": "closed form (each run's estimates)",
                 "predicted_pooled": "predicted (pooled estimates)"}.get(method, method)
        ax.errorbar(g.index, g["mean"], yerr=err, marker="o" if method == "observed" else None, ls=ls, label=label)
    opt = _rows(df, "harness_interval_optimum")
    members = opt[opt["method"] == "empirical_optimal_set"]["value"] if len(opt) else opt
    if len(members):   # the grid points not resolved from the best (paired 95 % CI over seeds)
        ax.axvspan(float(members.min()) * 0.9, float(members.max()) * 1.1, color="0.85", zorder=0,
                   label="not resolved from the best (95 % CI)")
    for method, ls in (("predicted_numeric_exact", (0, (1, 1))), ("empirical_best_mean", "-.")):
        v = opt[opt["method"] == method]["value"]
        if len(v):
            ax.axvline(float(v.iloc[-1]), color="k", ls=ls, lw=1, label=f"{method.replace('_', ' ')}")
    ax.set(xscale="log", xlabel="checkpoint interval (steps)", ylabel="TOR",
           title="Real fault-injected runs: TOR vs checkpoint interval")
    ax.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------------------------- report tables
@register_table("optimal_interval", EXP, "Optimal checkpoint interval and the exact TOR there (minutes)",
                sources="tor_optimal_interval",
                note="M = MTBF, δ = checkpoint cost, R = repair time; Daly's worked examples and the Llama-3 rate.")
def table_optimal_interval(rows):
    t = select(rows, "tor_optimal_interval", needs=("p.mtbf", "p.delta", "p.repair"))
    if t.empty:
        return None
    w = pivot(t, index=["p.mtbf", "p.delta", "p.repair", "method"], columns="metric",
              order=["tau_opt", "tor_exact", "tor_loss_low_30pct", "tor_loss_high_30pct"])
    return w.rename(columns={"p.mtbf": "M", "p.delta": "δ", "p.repair": "R", "tau_opt": "τ*",
                             "tor_exact": "exact TOR at τ*"})


@register_table("tor_breakdown", EXP, "Where the time goes at the Daly interval: share of each stage",
                sources="tor_breakdown")
def table_tor_breakdown(rows):
    t = select(rows, "tor_breakdown", needs=("p.mtbf", "p.tau", "p.stage"))
    if t.empty:
        return None
    w = pivot(t, index=["p.mtbf", "p.tau"], columns="p.stage", order=["useful", "checkpoint", "lost", "repair"])
    return w.rename(columns={"p.mtbf": "M (min)", "p.tau": "τ (min)"})


@register_table("tor_validation", EXP, "Monte Carlo simulator vs the exact closed form (TOR ± SE, z-score)",
                sources="tor_validation")
def table_tor_validation(rows):
    t = select(rows, "tor_validation", needs=("p.tau", "p.mtbf", "p.variant"))
    if t.empty:
        return None
    w = pivot(t, index=["p.variant", "p.tau", "p.mtbf"], columns=["method", "metric"], with_stderr=True,
              order=["closed_exact tor", "simulator tor", "simulator z_score"])
    return w.rename(columns={"p.variant": "variant", "p.tau": "τ (min)", "p.mtbf": "M (min)"})


@register_table("tor_robustness", EXP, "Non-exponential failures: simulated TOR (Weibull, lognormal)",
                sources="tor_robustness")
def table_tor_robustness(rows):
    t = select(rows, "tor_robustness", needs=("p.shape", "p.tau", "p.mtbf"))
    if t.empty:
        return None
    t = t.sort_values(["method", "p.shape", "p.mtbf", "p.tau"])
    return long(t, {"method": "method", "shape": "p.shape", "M (min)": "p.mtbf", "τ (min)": "p.tau"},
                value="TOR", n=True)


@register_table("tor_fail_slow", EXP, "Fail-slow policies: closed form vs simulator", sources="tor_fail_slow")
def table_tor_fail_slow(rows):
    t = select(rows, "tor_fail_slow", needs=("p.policy",))
    if t.empty:
        return None
    t = t.sort_values(["p.policy", "method"])
    return long(t, {"policy": "p.policy", "method": "method", "ρ": "p.rho", "slow MTBF": "p.slow_mtbf",
                    "D": "p.D", "P": "p.P"}, value="TOR")


@register_table("cost_table", EXP, "Training cost per GPT size, without and with failures (the deck's cost table)",
                sources="tor_cost_table", deck="training_costs",
                note="Compute inputs (GPUs, peak FLOP/s, MFU, price per GPU-hour) are this project's assumptions "
                     "(see the README), not MosaicML's; failures at Meta RSC-1's measured rate.")
def table_cost_table(rows):
    t = select(rows, "tor_cost_table", needs=("p.model", "p.gpus"))
    if t.empty:
        return None
    w = pivot(t, index=["p.model", "p.gpus"], columns="metric",
              order=["tokens_b", "days", "cost_usd", "mtbf_h", "tor", "days_with_failures", "cost_with_failures"])
    if "tokens_b" in w:
        w = w.sort_values("tokens_b", kind="stable")
    return w.rename(columns={"p.model": "model", "p.gpus": "GPUs", "tokens_b": "tokens (B)",
                             "cost_usd": "cost (USD)", "mtbf_h": "MTBF (h)", "tor": "TOR"})


@register_table("tor_vs_cluster", EXP, "TOR vs cluster size (Meta RSC-1 failure rate, Daly interval)",
                sources="tor_vs_cluster")
def table_tor_vs_cluster(rows):
    t = select(rows, "tor_vs_cluster", needs=("p.gpus",))
    if t.empty:
        return None
    t = t.sort_values("p.gpus")
    return long(t, {"GPUs": "p.gpus", "MTBF (h)": "p.mtbf_h", "τ (s)": "p.tau_s"}, value="TOR")


@register_table("harness_validation", EXP, "Real run (validation job): observed TOR, closed form, replay, estimates",
                sources="harness_validation",
                note="Times in seconds; stage_seconds rows book every second of the job to one stage.")
def table_harness_validation(rows):
    t = select(rows, "harness_validation")
    if t.empty:
        return None
    return long(t, {"method": "method", "metric": "metric", "stage": "p.stage", "job": "p.job",
                    "checkpoint every (steps)": "p.checkpoint_every", "MTBF (s)": "p.mtbf_s",
                    "restart": "p.restart"})


_SWEEP_COLUMNS = ["observed tor", "closed_form tor", "estimate T_obs", "estimate T_opt", "estimate delta",
                  "estimate repair", "estimate mtbf_uptime", "estimate tau"]


@register_table("harness_interval_sweep", EXP, "Real runs: TOR per checkpoint interval and fault seed",
                sources="harness_interval_sweep",
                note="One row per run (no averaging over seeds here; the figure shows the mean).")
def table_harness_interval_sweep(rows):
    t = select(rows, "harness_interval_sweep", needs=("p.checkpoint_every", "p.fault_seed"))
    t = t[t["p.fault_seed"].notna() & (t["metric"] != "stage_seconds")] if len(t) else t
    if t.empty:
        return None
    w = pivot(t, index=["p.checkpoint_every", "p.fault_seed"], columns=["method", "metric"], order=_SWEEP_COLUMNS)
    return w.rename(columns={"p.checkpoint_every": "checkpoint every (steps)", "p.fault_seed": "fault seed"})


@register_table("harness_prediction", EXP, "Real runs: predicted TOR per interval from pooled estimates",
                sources="harness_interval_sweep")
def table_harness_prediction(rows):
    t = select(rows, "harness_interval_sweep", method="predicted_pooled", needs=("p.checkpoint_every",))
    if t.empty:
        return None
    t = t.sort_values("p.checkpoint_every")
    return long(t, {"checkpoint every (steps)": "p.checkpoint_every", "MTBF (s)": "p.mtbf_s"},
                value="predicted TOR"), t


@register_table("harness_interval_optimum", EXP, "Real runs: predicted vs empirical optimal interval",
                sources="harness_interval_optimum")
def table_harness_interval_optimum(rows):
    t = select(rows, "harness_interval_optimum")
    if t.empty:
        return None
    return long(t, {"method": "method", "metric": "metric", "δ (s)": "p.delta", "R (s)": "p.repair",
                    "step (s)": "p.t_step", "MTBF (s)": "p.mtbf_s", "fault seeds": "p.n_fault_seeds"}, n=True)


@register_table("tor_vs_ettr", EXP, "TOR vs Meta's ETTR (Kokolis et al.) on the same inputs, by failure rate",
                sources="tor_vs_ettr",
                note="ETTR ≈ (1 − N·r_f·(u0 + Δt/2)) / (1 + w/Δt) at the Daly interval Δt; u0 = R, w = δ. "
                     "Rate scenarios: Meta RSC-1's failure rate per node-day × multipliers, and the rate implied by "
                     "Meta's measured MTTF at its cluster size (planning config). TOR 0 where the MTBF is below "
                     "the repair time.")
def table_tor_vs_ettr(rows):
    t = select(rows, "tor_vs_ettr", needs=("p.gpus", "p.rate_scenario"))
    if t.empty:
        return None
    w = pivot(t, index=["p.rate_scenario", "p.failures_per_1000_node_days", "p.gpus", "p.mtbf_h", "p.tau_s"],
              columns="method", order=["tor_exact", "tor_first_order", "ettr"])
    return w.rename(columns={"p.rate_scenario": "rate", "p.failures_per_1000_node_days": "per 1000 node-days",
                             "p.gpus": "GPUs", "p.mtbf_h": "MTBF (h)", "p.tau_s": "τ (s)",
                             "tor_exact": "TOR exact", "tor_first_order": "TOR first order", "ettr": "ETTR"})


@register_table("harness_interval_paired", EXP, "Real runs: each interval's TOR difference to the best, paired "
                "over fault seeds (t-interval)", sources="harness_interval_paired",
                note="resolved = the interval lies above 0; the unresolved intervals form the empirical optimal set.")
def table_harness_interval_paired(rows):
    t = select(rows, "harness_interval_paired", needs=("p.checkpoint_every",))
    if t.empty:
        return None
    w = pivot(t, index=["p.checkpoint_every", "p.best_steps"], columns="metric", with_stderr=True,
              order=["tor_diff_to_best", "ci95_low", "ci95_high", "resolved"])
    return w.rename(columns={"p.checkpoint_every": "checkpoint every (steps)", "p.best_steps": "best (steps)"})


@register_table("tor_bench", EXP, "Simulator speed: vectorised vs a Python per-event loop", sources="tor_bench")
def table_tor_bench(rows):
    t = select(rows, "tor_bench")
    if t.empty:
        return None
    return long(t, {"method": "method", "metric": "metric", "M": "p.mtbf", "τ": "p.tau", "δ": "p.delta",
                    "R": "p.repair"}, n=True)

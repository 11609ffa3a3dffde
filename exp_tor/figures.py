"""Figures of the TOR experiment, drawn from the results table (registered for results/make_figures.py)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from common.plotting import register_figure, style

EXP = "exp_tor"


def _rows(df, table, *cols: str):
    """The rows of one table, or an empty frame when the table or a needed column is absent."""
    if "table" not in df or any(c not in df for c in cols):
        return df.iloc[0:0]
    return df[df["table"] == table]


@register_figure("tor_vs_interval", experiment=EXP)
def tor_vs_interval(df):
    d = _rows(df, "tor_vs_interval", "p.mtbf", "p.tau")
    if d.empty:
        return None
    style()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (m, gm) in enumerate(d.groupby("p.mtbf")):
        for form, g in gm.groupby("method"):
            g = g.sort_values("p.tau")
            ax.plot(g["p.tau"], g["value"], color=f"C{i}", ls="-" if form == "exact" else "--",
                    label=f"M={m:g}" if form == "exact" else None)
    ax.set(xscale="log", xlabel="checkpoint interval τ (min)", ylabel="TOR", ylim=(0, 1),
           title="TOR vs checkpoint interval (δ, R fixed; dashed: first order)")
    ax.legend()
    return fig


@register_figure("tor_vs_cluster", experiment=EXP)
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


@register_figure("sim_vs_closed", experiment=EXP)
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


@register_figure("harness_rt", experiment=EXP)
def harness_rt(df):
    d = _rows(df, "harness_rt", "p.t")
    if d.empty:
        return None
    d = d.sort_values("p.t")
    style()
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.step(d["p.t"], d["value"], where="post")
    ax.set(xlabel="job time (s)", ylabel="r(t)", ylim=(-0.05, 1.05), title="Harness r(t) timeline")
    return fig


@register_figure("harness_interval_sweep", experiment=EXP)
def harness_interval_sweep(df):
    d = _rows(df, "harness_interval_sweep", "p.checkpoint_every")
    if d.empty:
        return None
    d = d[d["metric"] == "tor"]
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
    for method, ls in (("predicted_numeric_exact", (0, (1, 1))), ("empirical_peak", "-.")):
        v = opt[opt["method"] == method]["value"]
        if len(v):
            ax.axvline(float(v.iloc[-1]), color="k", ls=ls, lw=1, label=f"{method.replace('_', ' ')}")
    ax.set(xscale="log", xlabel="checkpoint interval (steps)", ylabel="TOR",
           title="Real fault-injected runs: TOR vs checkpoint interval")
    ax.legend(fontsize=7)
    return fig

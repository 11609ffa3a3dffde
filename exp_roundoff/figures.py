"""Figures and report tables of the round-off experiments, drawn from the results table (latest run of each
table; results/make_figures.py draws them and writes results/REPORT.md)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    FuncFormatter,
    LogFormatterSciNotation,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
)

from common.plotting import register_figure, style
from common.report import long, pivot, register_table, select

EXP = "exp_roundoff"


def _latest(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Rows of ``table`` from its most recent run (reruns append records; figures show the newest)."""
    t = df[df["table"] == table]
    if t.empty:
        return t
    return t[t["run_id"] == sorted(t["run_id"].unique())[-1]]


def _col(t: pd.DataFrame, key: str) -> pd.Series:
    return t[f"p.{key}"]


def _param(t: pd.DataFrame, key: str, default: str) -> str:
    """The one value of parameter ``key`` in these rows (rows written before it was logged: ``default``)."""
    vals = t[f"p.{key}"].dropna().unique() if f"p.{key}" in t else []
    return ", ".join(map(str, vals)) if len(vals) else default


def _depth_axis(ax, depths) -> None:
    """Log2 depth axis labelled with the integer depths themselves (not 2x10^0)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(int(d)) for d in depths])
    ax.xaxis.set_minor_locator(NullLocator())


@register_figure("error_vs_depth", experiment=EXP, sources="depth",
                 title="Error vs depth, random-init GPT-2 / Llama: measured, estimate, bound")
def error_vs_depth(df: pd.DataFrame):
    """Top row: measured mean / max and the statistical estimate; bottom row: the first-order bound on its own
    axis (it is orders of magnitude above and would squash the measurements). Colour = precision, line
    style = quantity: one legend of each."""
    t = _latest(df, "depth")
    if t.empty:
        return None
    style()
    archs = sorted(_col(t, "arch").unique())
    precs = sorted(t["method"].unique())
    depths = sorted(t["p.depth"].unique())
    fig, axes = plt.subplots(2, len(archs), figsize=(5 * len(archs), 6.4), squeeze=False, sharex=True,
                             height_ratios=(3, 2))
    kinds = (("measured_mean", "-o", "measured mean"), ("measured_max", ":", "measured max"),
             ("estimate_mean", "-.", "statistical estimate"))
    for col, arch in enumerate(archs):
        a = t[_col(t, "arch") == arch]
        top, bot = axes[0][col], axes[1][col]
        for i, prec in enumerate(precs):
            m = a[a["method"] == prec]
            for metric, ls, _ in kinds:
                s = m[m["metric"] == metric].sort_values("p.depth")
                top.plot(s["p.depth"], s["value"], ls, color=f"C{i}", ms=3)
            s = m[m["metric"] == "bound_mean"].sort_values("p.depth")
            bot.plot(s["p.depth"], s["value"], "--o", color=f"C{i}", ms=3)
        top.set(yscale="log", ylabel="relative l2 error after block L", title=f"{arch}, random init")
        bot.set(yscale="log", xlabel="depth L", ylabel="first-order bound (mean)")
        _depth_axis(bot, depths)
    colours = [Line2D([], [], color=f"C{i}", lw=2, label=prec) for i, prec in enumerate(precs)]
    styles = [Line2D([], [], color="k", ls=ls.rstrip("o"), marker="o" if "o" in ls else None, ms=3, label=label)
              for _, ls, label in kinds]
    axes[0][0].legend(handles=colours, title="precision", fontsize=7, title_fontsize=7, loc="upper left")
    axes[0][-1].legend(handles=styles, fontsize=7, loc="upper left")
    return fig


@register_figure("estimate_ratio", experiment=EXP, sources="estimate_check",
                 title="Statistical estimate / measured error vs depth, per init std (held-out random models)")
def estimate_ratio(df: pd.DataFrame):
    t = _latest(df, "estimate_check")
    t = t[t["metric"] == "ratio"]
    if t.empty:
        return None
    style()
    archs = sorted(_col(t, "arch").unique())
    fig, axes = plt.subplots(1, len(archs), figsize=(4 * len(archs), 3.4), squeeze=False, sharey=True)
    for ax, arch in zip(axes[0], archs):
        a = t[_col(t, "arch") == arch]
        for i, std in enumerate(sorted(_col(a, "init_std").unique())):
            for prec, ls in zip(sorted(a["method"].unique()), ("-o", "--s", ":^")):
                s = a[(_col(a, "init_std") == std) & (a["method"] == prec)].sort_values("p.depth")
                ax.plot(s["p.depth"], s["value"], ls, ms=3, color=f"C{i}", label=f"std {std:g} ({prec})")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(yscale="log", xlabel="depth L", title=f"{arch}, random init")
        _depth_axis(ax, sorted(a["p.depth"].unique()))
    axes[0][0].set_ylabel("estimate / measured (mean error)")
    axes[0][0].legend(fontsize=6)
    return fig


@register_figure("error_vs_layer_smollm2", experiment=EXP, sources="depth_real",
                 title="SmolLM2-135M-Instruct: error per layer, measured vs estimate vs bound")
def error_vs_layer_real(df: pd.DataFrame):
    t = _latest(df, "depth_real")
    t = t[t["metric"] != "logits_mean"]
    if t.empty:
        return None
    style()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, prec in enumerate(sorted(t["method"].unique())):
        m = t[t["method"] == prec]
        for metric, ls in (("measured_mean", "-"), ("measured_median", ":"), ("estimate_mean", "-.")):
            s = m[m["metric"] == metric].sort_values("p.layer")
            ax.plot(s["p.layer"], s["value"], ls, color=f"C{i}", label=f"{prec} {metric}")
        s = m[m["metric"] == "bound_mean"].sort_values("p.layer")
        ax2.plot(s["p.layer"], s["value"], "--", color=f"C{i}", label=f"{prec} bound_mean")
    ax.set(yscale="log", xlabel="layer", ylabel="relative l2 error (residual stream)",
           title=f"{t['p.model'].iloc[0]}: measured vs statistical estimate")
    ax2.set(yscale="log", xlabel="layer", ylabel="first-order worst-case bound",
            title="the bound (overflows float64 in deep layers)")
    ax.legend(fontsize=6, ncol=2)
    ax2.legend(fontsize=6)
    return fig


@register_figure("mean_vs_median", experiment=EXP, sources="mean_vs_median",
                 title="Per-token error distribution: mean vs median")
def mean_vs_median(df: pd.DataFrame):
    t = _latest(df, "mean_vs_median")
    t = t[t["metric"].str.startswith("token_") & (t["metric"] != "token_mean_over_median")]
    if t.empty:
        return None
    style()
    errors = sorted(_col(t, "error").unique())
    fig, axes = plt.subplots(1, len(errors), figsize=(5.5 * len(errors), 3.6), squeeze=False)
    order = ["token_p01", "token_p25", "token_median", "token_mean", "token_p75", "token_p99", "token_max"]
    for ax, err in zip(axes[0], errors):
        e = t[_col(t, "error") == err]
        groups = sorted({(m, g) for m, g in zip(e["method"], e["p.init_gain"])})
        width = 0.8 / max(1, len(groups))
        for j, (prec, gain) in enumerate(groups):
            s = e[(e["method"] == prec) & (e["p.init_gain"] == gain)].set_index("metric")["value"]
            ax.bar([i + j * width for i in range(len(order))], [s.get(k, float("nan")) for k in order], width,
                   label=f"{prec}, gain {gain:g}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(order))], [k[6:] for k in order])
        ax.set(yscale="log", ylabel=f"{err} per token", title=f"distribution over tokens x inits ({err})")
        ax.legend(fontsize=6)
    return fig


@register_figure("accumulation", experiment=EXP, sources=("accumulation", "high_precision_ops", "low_precision_ops"),
                 title="Accumulation format and block size; which op groups need precision")
def accumulation(df: pd.DataFrame):
    t = _latest(df, "accumulation")
    h = _latest(df, "high_precision_ops")
    lo = _latest(df, "low_precision_ops")
    if t.empty and h.empty:
        return None
    style()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 3.6))
    t = t[t["metric"] == "logits_mean"]
    for i, meth in enumerate(sorted(t["method"].unique())):
        s = t[t["method"] == meth].copy()
        s["k"] = s["p.block_k"].map(lambda k: "exact" if k == 0 else str(int(k)))
        s = s.sort_values("p.block_k", key=lambda k: k.replace(0, 10**9))
        a1.plot(s["k"], s["value"], "-o", color=f"C{i}", label=meth)
    a1.set(yscale="log", xlabel="block_k (roundings of the running sum every k products)",
           ylabel="logits relative error", title="accumulation format and block size")
    a1.legend()
    h = h[h["metric"] == "logits_mean"].sort_values("value")
    if not h.empty:
        a2.barh(h["method"], h["value"], color=["C3" if m == "none" else "C0" for m in h["method"]])
        a2.set(xscale="log", xlabel="logits relative error", title="bf16 model, one op group promoted to fp32")
    lo = lo[lo["metric"] == "logits_mean"].sort_values("value")
    if not lo.empty:
        a3.barh(lo["method"], lo["value"], color=["C3" if m == "all" else "C1" for m in lo["method"]])
        a3.set(xscale="log", xlabel="logits relative error", title="fp32 model, one op group demoted to bf16")
    return fig


@register_figure("hyperparameters", experiment=EXP, sources="hyper",
                 title="Hyper-parameter sweeps: logits error")
def hyperparameters(df: pd.DataFrame):
    """One panel per sweep; every panel labels its own y ticks (a sweep that spans less than a decade gets
    labelled minor ticks), the title names the arch and precision the stage ran."""
    t = _latest(df, "hyper")
    t = t[t["metric"] == "logits_mean"]
    if t.empty:
        return None
    style()
    sweeps = list(dict.fromkeys(t["method"]))
    n = len(sweeps)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
    for ax, sweep in zip(axes.flat, sweeps):
        s = t[t["method"] == sweep]
        norms = sorted(_col(s, "norm").unique())
        values = sorted(s["p.value"].astype(float).unique())
        # 0 (no outlier) has no place on a log axis: drawn a decade left of the smallest positive value
        zero_at = min((v for v in values if v > 0), default=10.0) / 10
        for i, norm in enumerate(norms):
            v = s[_col(s, "norm") == norm].sort_values("p.value")
            x = v["p.value"].astype(float)
            ax.plot(x.where(x > 0, zero_at), v["value"], "-o", ms=3, color=f"C{i}", label=norm)
        ax.set(xscale="log", yscale="log", xlabel=sweep.replace("_", " "), ylabel="logits rel. l2 error")
        # x ticks at the swept values themselves, y ticks labelled however narrow the panel's range
        ax.set_xticks([x if x > 0 else zero_at for x in values], [f"{x:g}" for x in values])
        ax.xaxis.set_minor_locator(NullLocator())
        lo, hi = s["value"].min(), s["value"].max()
        if lo > 0 and hi / lo < 10:  # within a decade a log locator may place no tick at all: linear ticks
            ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.3g}"))
            ax.yaxis.set_minor_locator(NullLocator())
        elif lo > 0 and hi / lo < 100:  # one or two decades: label 1, 2, 5 x 10^k
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(NullFormatter())
        if len(norms) > 1:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    arch, prec = _param(t, "arch", "gpt2"), _param(t, "precision", "precision not logged")
    fig.suptitle(f"hyper-parameter sweeps: {arch}-style random init, {prec}, logits error (mean over tokens)",
                 fontsize=9)
    return fig


@register_figure("softmax_sinks", experiment=EXP, sources="softmax_sinks",
                 title="Softmax alone with one sink logit")
def softmax_sinks(df: pd.DataFrame):
    t = _latest(df, "softmax_sinks")
    if t.empty:
        return None
    style()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric in zip(axes, ("rel_l2_mean", "nonsink_comp_max")):
        m = t[t["metric"] == metric]
        for i, meth in enumerate(sorted(m["method"].unique())):
            s = m[m["method"] == meth].sort_values("p.sink_logit")
            ax.plot(s["p.sink_logit"], s["value"], "-o", color=f"C{i}", label=meth)
        ax.set(yscale="log", xlabel="sink logit (added to token 0)", ylabel=metric, title=f"softmax: {metric}")
        ax.legend()
    return fig


@register_figure("attention_sinks", experiment=EXP, sources="attention_sinks",
                 title="In-model attention sinks: error vs sink mass")
def attention_sinks(df: pd.DataFrame):
    """Error vs the measured sink mass of in-model sinks (stage ``sinks``), one line per precision and arch."""
    t = _latest(df, "attention_sinks")
    if t.empty:
        return None
    style()
    panels = (("logits_mean", "logits rel. l2 error (mean)"),
              ("softmax_comp_mean", "softmax componentwise error\n(non-sink probabilities)"),
              ("attn_value_mean", "attention output (P V) rel. l2 error"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    archs = sorted(_col(t, "arch").unique())
    for ax, (metric, label) in zip(axes, panels):
        m = t[t["metric"] == metric]
        for i, prec in enumerate(sorted(m["method"].unique())):
            for arch, ls in zip(archs, ("-o", "--s", ":^")):
                s = m[(m["method"] == prec) & (_col(m, "arch") == arch)].sort_values("p.sink_mass")
                # 1 - mass on a log axis spreads 0.9 / 0.99 / 0.999; inverted so stronger sinks are to the right
                ax.plot(1 - s["p.sink_mass"], s["value"], ls, ms=3, color=f"C{i}", label=f"{prec} ({arch})")
        ax.set(xscale="log", yscale="log", xlabel="1 - mean attention mass on the sink (float64)", ylabel=label)
        ax.invert_xaxis()
    axes[0].legend(fontsize=6)
    fig.suptitle("in-model attention sinks (random init, token 0 = sink)", fontsize=9)
    return fig


@register_figure("mixed_precision_training", experiment=EXP, sources="mixed_precision_training", deck="mixed_precision",
                 title="Mixed-precision training: validation loss per precision mode")
def mixed_precision_training(df: pd.DataFrame):
    t = _latest(df, "mixed_precision_training")
    if t.empty:
        return None
    style()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    m = t[t["metric"] == "val_loss_mean"]
    ax.bar(m["method"], m["value"], yerr=m["stderr"].fillna(0), capsize=3)
    seeds = t[t["metric"] == "val_loss"]
    ax.plot(seeds["method"], seeds["value"], "k.", ms=4, label="seeds")
    lo = min(seeds["value"].min(), m["value"].min())
    ax.set(ylim=(lo * 0.95, None), ylabel="validation loss (nats/byte)",
           title="tiny Llama on tinyshakespeare bytes: precision mode")
    ax.legend()
    return fig


@register_figure("guidelines", experiment=EXP, sources="guidelines",
                 title="Guidelines: evidence ratios")
def guidelines(df: pd.DataFrame):
    t = _latest(df, "guidelines")
    if t.empty:
        return None
    style()
    share = t["method"].str.startswith("bf16_error_share_")   # these rows are shares of the error, not ratios
    ratios, shares = t[~share], t[share]
    fig, axes = plt.subplots(1, 2 if len(shares) else 1, squeeze=False,
                             figsize=(12 if len(shares) else 7, 0.35 * max(len(ratios), len(shares)) + 1.2))
    ax = axes[0, 0]
    ax.barh(ratios["method"], ratios["value"])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="evidence ratio (>1: the guideline reduces the error)", title="guidelines")
    if len(shares):
        ax = axes[0, 1]
        ax.barh(shares["method"].str.replace("bf16_error_share_", "", regex=False), shares["value"])
        ax.set(xlabel="logits error with only this group in bf16 / with everything in bf16",
               title="where the bf16 error comes from")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- report tables
AUTHORS_NOTE = ("abs_linf = absolute l-inf error of a token (max over the hidden dim), min_token_l2 = smallest "
                "l2 norm of a float64 reference token (the authors' metrics; a small reference token explains a "
                "large relative error).")
def _latest_rows(rows: pd.DataFrame, table: str, needs: tuple[str, ...] = ()) -> pd.DataFrame:
    """The rows of ``table``'s most recent run, as the figures show them (empty if a column is missing)."""
    t = select(rows, table, needs=needs)
    return t[t["run_id"] == sorted(t["run_id"].unique())[-1]] if len(t) else t


@register_table("depth", EXP, "Relative error of the residual stream after block L, random-init models",
                sources="depth",
                note="Mean over tokens unless the column says otherwise; bound = first-order worst case, "
                     "estimate = statistical estimate. " + AUTHORS_NOTE)
def table_depth(rows):
    t = _latest_rows(rows, "depth", ("p.arch", "p.depth"))
    if t.empty:
        return None
    w = pivot(t, index=["p.arch", "method", "p.depth"], columns="metric",
              order=["measured_mean", "measured_median", "measured_p99", "measured_max", "abs_linf_mean",
                     "abs_linf_max", "min_token_l2", "estimate_mean", "bound_mean", "bound_median"])
    return w.rename(columns={"p.arch": "arch", "method": "precision", "p.depth": "depth L"}), t


@register_table("estimate_check", EXP, "Statistical estimate vs measured error after block L, held-out random "
                "models across init std", sources="estimate_check",
                note="ratio = estimate_mean / measured_mean (mean per-token relative l2 error of the residual "
                     "stream after the last block); token_ratio_median = median over tokens of the per-token ratio.")
def table_estimate_check(rows):
    t = _latest_rows(rows, "estimate_check", ("p.arch", "p.init_std", "p.depth"))
    if t.empty:
        return None
    w = pivot(t, index=["method", "p.init_std", "p.arch", "p.depth"], columns="metric",
              order=["measured_mean", "estimate_mean", "ratio", "token_ratio_median"])
    return w.rename(columns={"method": "precision", "p.init_std": "init std", "p.arch": "arch",
                             "p.depth": "depth L"}), t


@register_table("estimate_range", EXP, "Range of the estimate / measured ratio per init std (over depths)",
                sources="estimate_range",
                note="arch all = over every arch and depth of the estimate_check table; depth_at_max = the depth "
                     "of the largest ratio.")
def table_estimate_range(rows):
    t = _latest_rows(rows, "estimate_range", ("p.arch", "p.init_std"))
    if t.empty:
        return None
    w = pivot(t, index=["method", "p.init_std", "p.arch"], columns="metric",
              order=["ratio_min", "ratio_max", "depth_at_max"])
    return w.rename(columns={"method": "precision", "p.init_std": "init std", "p.arch": "arch"}), t


def _some_layers(layers: list) -> set:
    """First block, block 5 and a middle one, the last block, and the last index (the logits row)."""
    picks = [0, 5, len(layers) // 2, len(layers) - 2, len(layers) - 1]
    return {layers[i] for i in picks if 0 <= i < len(layers)}


@register_table("depth_real", EXP, "SmolLM2-135M-Instruct: error per layer (selected layers; all in the figure)",
                sources="depth_real",
                note="The last layer index holds the logits row (logits_mean); a bound of — overflowed float64. "
                     + AUTHORS_NOTE)
def table_depth_real(rows):
    t = _latest_rows(rows, "depth_real", ("p.layer",))
    t = t[t["p.layer"].isin(_some_layers(sorted(t["p.layer"].unique())))] if len(t) else t
    if t.empty:
        return None
    w = pivot(t, index=["method", "p.layer"], columns="metric",
              order=["measured_mean", "measured_median", "measured_max", "abs_linf_mean", "abs_linf_max",
                     "min_token_l2", "estimate_mean", "bound_mean", "logits_mean"])
    return w.rename(columns={"method": "precision", "p.layer": "layer"}), t


@register_table("mean_vs_median", EXP, "Per-token error distribution over tokens × initialisations",
                sources="mean_vs_median",
                note="token_mean_over_median is the ratio the experiment logged; min_token_l2 (smallest l2 norm "
                     "of a float64 reference token at the last block) is on the rel_l2 row.")
def table_mean_vs_median(rows):
    t = _latest_rows(rows, "mean_vs_median", ("p.error", "p.init_gain"))
    t = t[t["metric"].str.startswith("token_") | (t["metric"] == "min_token_l2")] if len(t) else t
    if t.empty:
        return None
    order = ["token_p01", "token_p25", "token_median", "token_mean", "token_p75", "token_p99", "token_max",
             "token_mean_over_median", "min_token_l2"]
    w = pivot(t, index=["method", "p.error", "p.init_gain"], columns="metric", order=order)
    return w.rename(columns={"method": "precision", "p.error": "error", "p.init_gain": "init gain"}), t


@register_table("accumulation", EXP, "Accumulation format and block size (bf16 / fp16 storage)",
                sources="accumulation", note="block_k 0 = exact accumulation, one rounding of the sum. "
                + AUTHORS_NOTE)
def table_accumulation(rows):
    t = _latest_rows(rows, "accumulation", ("p.block_k",))
    if t.empty:
        return None
    w = pivot(t, index=["method", "p.block_k"], columns="metric",
              order=["logits_mean", "logits_median", "gemm_local_mean", "logits_abs_linf_mean",
                     "logits_min_token_l2"])
    return w.rename(columns={"method": "storage/accumulator", "p.block_k": "block_k"}), t


@register_table("op_groups", EXP, "Which op groups need precision: logits error with one group changed",
                sources=("high_precision_ops", "low_precision_ops"))
def table_op_groups(rows):
    hi = _latest_rows(rows, "high_precision_ops")
    lo = _latest_rows(rows, "low_precision_ops")
    t = pd.concat([hi, lo])
    t = t[t["metric"] == "logits_mean"] if len(t) else t
    if t.empty:
        return None
    w = pivot(t, index=["method"], columns="table", order=["high_precision_ops", "low_precision_ops"])
    return w.rename(columns={"method": "op group",
                             "high_precision_ops": "bf16 model, this group in fp32",
                             "low_precision_ops": "fp32 model, this group in bf16"}), t


@register_table("hyper", EXP, "Hyper-parameter sweeps (GPT-2 style, bf16)", sources="hyper",
                note="block_* = residual stream after the last block. " + AUTHORS_NOTE)
def table_hyper(rows):
    t = _latest_rows(rows, "hyper", ("p.value", "p.norm"))
    if t.empty:
        return None
    w = pivot(t, index=["method", "p.value", "p.norm"], columns="metric",
              order=["logits_mean", "block_mean", "block_median", "block_abs_linf_mean", "block_min_token_l2",
                     "max_prob_mean", "norm_cond_max", "omega_kq", "omega_ud"])
    return w.rename(columns={"method": "sweep", "p.value": "value", "p.norm": "norm"}), t


@register_table("softmax_sinks", EXP, "Softmax alone, bf16, one sink logit", sources="softmax_sinks")
def table_softmax_sinks(rows):
    t = _latest_rows(rows, "softmax_sinks", ("p.sink_logit", "p.sink_mass"))
    if t.empty:
        return None
    w = pivot(t, index=["method", "p.sink_logit", "p.sink_mass"], columns="metric",
              order=["nonsink_comp_max", "rel_l2_mean"])
    return w.rename(columns={"method": "evaluation", "p.sink_logit": "sink logit", "p.sink_mass": "sink mass"}), t


@register_table("attention_sinks", EXP, "In-model attention sinks: error vs measured sink mass",
                sources="attention_sinks",
                note="Sink mass and logit gap as measured on the float64 reference; target 0 = control "
                     "(massive activation, no sink). " + AUTHORS_NOTE)
def table_attention_sinks(rows):
    t = _latest_rows(rows, "attention_sinks", ("p.arch", "p.target_mass", "p.sink_mass", "p.sink_gap"))
    if t.empty:
        return None
    w = pivot(t, index=["p.arch", "method", "p.target_mass", "p.sink_mass", "p.sink_gap"], columns="metric",
              order=["logits_mean", "logits_p99", "logits_abs_linf_mean", "logits_min_token_l2",
                     "softmax_comp_mean", "softmax_l2_mean", "attn_value_mean", "attn_value_local_mean",
                     "estimate_logits_mean", "bound_logits_mean"])
    return w.rename(columns={"p.arch": "arch", "method": "precision", "p.target_mass": "target",
                             "p.sink_mass": "sink mass", "p.sink_gap": "logit gap"}), t


@register_table("mixed_precision_training", EXP, "Mixed-precision training: final validation loss (nats/byte)",
                sources="mixed_precision_training", deck="mixed_precision",
                note="Tiny Llama on tinyshakespeare bytes; val_loss_mean ± SE over seeds as the experiment "
                     "logged it, then each seed's run.")
def table_mixed_precision(rows):
    t = _latest_rows(rows, "mixed_precision_training", ("seed",))
    if t.empty:
        return None
    mean = t[t["metric"] == "val_loss_mean"]
    seeds = t[t["metric"] == "val_loss"]
    w = pivot(mean, index=["method"], columns="metric", with_stderr=True)
    w["n"] = w["method"].map(dict(zip(mean["method"], mean["n"])))
    if len(seeds):
        s = pivot(seeds, index=["method"], columns="seed", prefix="val_loss seed ")
        w = w.merge(s, on="method", how="outer")
    order = {"fp32": 0, "bf16_autocast": 1, "fp16_loss_scaling": 2}  # the baseline first, as in the deck
    w = w.sort_values("method", key=lambda m: m.map(lambda x: (order.get(x, 9), x)))
    return w.rename(columns={"method": "precision mode"}), t


@register_table("guidelines", EXP, "Guidelines and the evidence ratio behind each", sources="guidelines")
def table_guidelines(rows):
    t = _latest_rows(rows, "guidelines")
    if t.empty:
        return None
    return long(t, {"guideline": "method", "evidence": "p.evidence"}, value="ratio"), t



@register_figure("authors_sweep", experiment=EXP, sources="authors_sweep",
                 title="Authors' sweep: one GEMM's accumulator rounded to p bits, error at the last block's output")
def authors_sweep(df: pd.DataFrame):
    t = _latest(df, "authors_sweep")
    if t.empty:
        return None
    t = t[(t["p.resid_kind"] == "none") & (t["p.point"] == "block_out")]
    t = t[t["p.layer"] == t["p.layer"].max()]
    refs = [r for r in ("fp64", "fp32") if (t["p.reference"] == r).any()]
    modes = [m for m in ("strict", "efficient") if (t["p.mode"] == m).any()]
    if not refs or not modes:
        return None
    style()
    fig, axes = plt.subplots(len(refs), len(modes), figsize=(5.5 * len(modes), 3.6 * len(refs)), squeeze=False,
                             sharex=True)
    for i, ref in enumerate(refs):
        for j, mode in enumerate(modes):
            ax = axes[i, j]
            g = t[(t["p.reference"] == ref) & (t["p.mode"] == mode)]
            for target, h in g.groupby("method"):
                # exact zeros (the fp32 reference at p = 23) cannot sit on a log axis: not drawn
                mid = h[(h["metric"] == "rel_linf_p50") & (h["value"] > 0)].sort_values("p.p")
                hi = h[(h["metric"] == "rel_linf_p99") & (h["value"] > 0)].sort_values("p.p")
                line = ax.plot(mid["p.p"], mid["value"], marker="o", ms=3, label=target)[0]
                ax.plot(hi["p.p"], hi["value"], ls=":", color=line.get_color())
            zero = " (exact zeros not drawn)" if (g["value"] == 0).any() else ""
            ax.set(yscale="log", title=f"{mode} accumulation, against the {ref} model{zero}",
                   ylabel="rel_linf per token (solid p50, dotted p99)" if j == 0 else None)
            if i == len(refs) - 1:
                ax.set_xlabel("mantissa bits p of the rounded GEMM accumulator")
            ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    return fig

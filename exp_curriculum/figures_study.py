"""Figures and report tables of the curriculum training study (part 2), drawn from the rows of study_table:
curriculum_curves (validation loss per language at each evaluation), curriculum_speedup (paired differences
arm - random over seeds, with their intervals). Imported by exp_curriculum/figures.py.

When the committed ``small`` study and a ``quick`` smoke test are both in the table, the figures show the
small study (the smoke test's curves are too short to say anything); otherwise whatever profile is there.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from common.plotting import register_figure
from common.report import long, register_table

EXP = "exp_curriculum"
CURVES, SPEEDUP = "curriculum_curves", "curriculum_speedup"
PROFILE_PREFERENCE = ("small", "paper")   # shown before any other profile's rows
LANG_NAMES = {"en": "English", "fr": "French"}


def study_rows(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """One profile's rows of a study table: the first of PROFILE_PREFERENCE present, else the newest; of
    that profile, the newest run's rows only (a re-tabled study logs rows whose params, e.g. a verdict, may
    differ from the old ones, so the old rows would not be superseded row by row)."""
    d = df[df["table"] == table] if "table" in df else df.iloc[0:0]
    if d.empty or "profile" not in d:
        return d
    chosen = next((p for p in PROFILE_PREFERENCE if (d["profile"] == p).any()), None)
    if chosen is None:
        chosen = d.sort_values("start_time")["profile"].iloc[-1]
    d = d[d["profile"] == chosen]
    if "run_id" in d:
        d = d[d["run_id"] == d.sort_values(["start_time", "run_id"])["run_id"].iloc[-1]]
    return d


def arm_group(arm: str) -> str:
    """Panel of an arm in the curve figures."""
    if arm.startswith("select:"):
        return "selection at equal tokens"
    if arm.startswith("mix:"):
        return "mixtures"
    if arm.startswith(("easy_to_hard:", "hard_to_easy:")) and arm.count(":") == 1:
        return "easy -> hard by metric"
    return "strategies"


GROUPS = ("easy -> hard by metric", "strategies", "selection at equal tokens", "mixtures")


def t_band(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the t-interval over seeds (NaN band with one seed)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    m = float(v.mean()) if len(v) else np.nan
    if len(v) < 2:
        return m, np.nan, np.nan
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return m, m - half, m + half


def curve_table(d: pd.DataFrame, language: str, schedule: str) -> pd.DataFrame:
    """Validation-loss points of one language and schedule: arm, seed, tokens, loss."""
    c = d[(d["metric"] == f"val_loss_{language}") & (d["p.schedule"] == schedule)]
    return pd.DataFrame({"arm": c["method"].to_numpy(), "seed": c["p.seed"].to_numpy(),   # the run's seed
                         "tokens": c["p.tokens"].astype(float).to_numpy(), "loss": c["value"].to_numpy()})


def _bands(t: pd.DataFrame, arm: str, minus: pd.DataFrame | None = None) -> tuple[np.ndarray, ...]:
    """(tokens, mean, low, high) over seeds of an arm's curve, or of arm - random paired by seed."""
    a = t[t["arm"] == arm].pivot_table(index="tokens", columns="seed", values="loss")
    if minus is not None:
        seeds = a.columns.intersection(minus.columns)
        a = a[seeds] - minus.loc[a.index, seeds]
    rows = [t_band(a.loc[x].to_numpy()) for x in a.index]
    m, lo, hi = (np.array(col) for col in zip(*rows)) if rows else (np.zeros(0),) * 3
    return a.index.to_numpy(), m, lo, hi


def _curve_figure(df: pd.DataFrame, schedule: str, difference: bool):
    d = study_rows(df, CURVES)
    if d.empty or "p.schedule" not in d or not (d["p.schedule"] == schedule).any():
        return None
    languages = [lg for lg in ("en", "fr") if (d["metric"] == f"val_loss_{lg}").any()]
    fig, axes = plt.subplots(len(languages), len(GROUPS), figsize=(4.2 * len(GROUPS), 3.4 * len(languages)),
                             squeeze=False, sharex=True)
    for i, lg in enumerate(languages):
        t = curve_table(d, lg, schedule)
        base = t[t["arm"] == "random"].pivot_table(index="tokens", columns="seed", values="loss")
        for j, group in enumerate(GROUPS):
            ax = axes[i, j]
            arms = sorted(a for a in t["arm"].unique() if a != "random" and arm_group(a) == group)
            if difference:
                ax.axhline(0.0, color="black", lw=1, label="random")
            else:
                x, m, lo, hi = _bands(t, "random")
                ax.plot(x, m, color="black", lw=1.5, label="random")
                ax.fill_between(x, lo, hi, color="black", alpha=0.12)
            for k, arm in enumerate(arms):
                x, m, lo, hi = _bands(t, arm, base if difference else None)
                color = plt.cm.tab10(k % 10)
                ax.plot(x, m, color=color, lw=1.2, label=arm)
                ax.fill_between(x, lo, hi, color=color, alpha=0.15)
            if i == 0:
                ax.set_title(group, fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{LANG_NAMES.get(lg, lg)}: " + ("val loss - random" if difference
                                                               else "validation loss"))
            if i == len(languages) - 1:
                ax.set_xlabel("training tokens")
            if not difference:
                ax.set_ylim(top=np.nanpercentile(t["loss"], 75))   # the early, steep part would flatten the rest
            ax.legend(fontsize=6.5, loc="upper right")
            ax.grid(alpha=0.3)
    seeds = d["p.seed"].nunique()
    fig.suptitle(f"{schedule} LR, mean over {seeds} seed(s), band = t-interval (ninety-five percent)"
                 + (" of the paired difference" if difference else ""), fontsize=10)
    fig.tight_layout()
    return fig


@register_figure("study_learning_curves", experiment=EXP, sources=CURVES, deck=("d4", "curriculum"),
                 title="Curriculum study: validation loss vs tokens, each arm vs random (constant LR)")
def study_learning_curves(df):
    return _curve_figure(df, "constant", difference=False)


@register_figure("study_curve_differences", experiment=EXP, sources=CURVES, deck="curriculum",
                 title="Curriculum study: validation loss minus random's at the same seed (constant LR)")
def study_curve_differences(df):
    return _curve_figure(df, "constant", difference=True)


@register_figure("study_curve_differences_wsd", experiment=EXP, sources=CURVES, deck="curriculum",
                 title="Curriculum study under warmup-stable-decay: validation loss minus random's")
def study_curve_differences_wsd(df):
    return _curve_figure(df, "wsd", difference=True)


@register_figure("study_speedup", experiment=EXP, sources=SPEEDUP, deck=("curriculum", "d4", "askllm", "density"),
                 title="Curriculum study: speed-up to random's final loss per arm, t-interval over seeds")
def study_speedup(df):
    d = study_rows(df, SPEEDUP)
    d = d[d["metric"] == "speedup"] if not d.empty else d
    if d.empty or "p.schedule" not in d:
        return None
    schedules = [s for s in ("constant", "wsd") if (d["p.schedule"] == s).any()]
    evals = [e for e in ("en", "fr", "mean") if (d["p.eval"] == e).any()]
    arms = sorted(d["method"].unique(), key=lambda a: (GROUPS.index(arm_group(a)), a))
    fig, axes = plt.subplots(1, len(schedules), figsize=(6.5 * len(schedules), 0.32 * len(arms) + 1.6),
                             squeeze=False, sharey=True)
    y = np.arange(len(arms))
    for ax, schedule in zip(axes[0], schedules):
        g = d[d["p.schedule"] == schedule]
        for k, ev in enumerate(evals):
            e = g[g["p.eval"] == ev].set_index("method")
            off = (k - (len(evals) - 1) / 2) * 0.22
            m = e["value"].reindex(arms).to_numpy(dtype=float)
            lo = e["p.t_low"].reindex(arms).to_numpy(dtype=float)
            hi = e["p.t_high"].reindex(arms).to_numpy(dtype=float)
            cens = (e["p.verdict"].reindex(arms) == "censored").to_numpy()
            line = ax.errorbar(m, y + off, xerr=[m - lo, hi - m], fmt="o", ms=3.5, capsize=2,
                               label=f"eval: {LANG_NAMES.get(ev, ev)}")
            ax.scatter(m[cens], (y + off)[cens], s=30, facecolors="white", edgecolors=line[0].get_color(),
                       zorder=3, label="censored: a seed never reached the target" if k == 0 else None)
        ax.axvline(0.0, color="black", lw=1)
        ax.set_yticks(y, arms, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speed-up = 1 - tokens_arm / tokens_random (to random's smoothed final loss)")
        ax.set_title(f"{schedule} LR", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


@register_figure("study_mixtures", experiment=EXP, sources=CURVES, deck="curriculum",
                 title="EN/FR and easy/hard mixtures: final validation loss per language, t-interval over seeds")
def study_mixtures(df):
    d = study_rows(df, CURVES)
    if d.empty or "p.schedule" not in d:
        return None
    d = d[d["p.schedule"] == "constant"]
    arms = ["random", *sorted(a for a in d["method"].unique() if a.startswith("mix:"))]
    if len(arms) < 2:
        return None
    languages = [lg for lg in ("en", "fr") if (d["metric"] == f"val_loss_{lg}").any()]
    fig, axes = plt.subplots(1, len(languages), figsize=(5.5 * len(languages), 0.45 * len(arms) + 1.8),
                             squeeze=False, sharey=True)
    y = np.arange(len(arms))
    for ax, lg in zip(axes[0], languages):
        t = curve_table(d, lg, "constant")
        last = t[t["tokens"] == t.groupby("arm")["tokens"].transform("max")]
        bands = [t_band(last[last["arm"] == a]["loss"].to_numpy()) for a in arms]
        m, lo, hi = (np.array(c) for c in zip(*bands))
        ax.errorbar(m, y, xerr=[m - lo, hi - m], fmt="o", capsize=3)
        ax.axvline(m[0], color="black", lw=1, ls="--")
        ax.set_yticks(y, arms, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"final {LANG_NAMES.get(lg, lg)} validation loss")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("pool composition at the same token budget (random = the base pool's EN share)", fontsize=10)
    fig.tight_layout()
    return fig


@register_table("study_speedup", EXP, "Curriculum study: paired differences arm - random over seeds",
                sources=SPEEDUP, deck=("curriculum", "d4", "askllm", "density"),
                note="speedup = 1 - tokens to reach random's smoothed final validation loss / random's tokens "
                     "(positive = faster); the other metrics are arm minus random at the same seed (negative = "
                     "lower loss). Intervals: two-sided ninety-five percent t and percentile bootstrap over "
                     "seeds; verdict = whether the t-interval excludes 0 in the arm's favour. eval = the validation "
                     "language (mean = both).")
def table_study_speedup(rows):
    t = study_rows(rows, SPEEDUP)
    if t.empty or "p.schedule" not in t:
        return None
    t = t.assign(_g=t["method"].map(lambda a: GROUPS.index(arm_group(a))))
    t = t.sort_values(["p.schedule", "metric", "_g", "method", "p.eval"])
    cols = {"schedule": "p.schedule", "arm": "method", "metric": "metric", "eval": "p.eval",
            "t low": "p.t_low", "t high": "p.t_high", "bootstrap low": "p.boot_low",
            "bootstrap high": "p.boot_high", "verdict": "p.verdict", "seeds": "n", "no target": "p.n_missing"}
    return long(t, cols, value="mean"), t

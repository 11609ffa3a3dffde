"""Convergence metrics of validation curves (curriculum.md §4.3) and paired statistics over seeds.

A curve is (tokens, loss) at the evaluation points. Speed is measured against the random baseline of the
same seed and LR schedule: the target is the baseline's final *smoothed* loss, ``tokens_to_target`` the
first (linearly interpolated) point where a smoothed curve reaches it, and
``speedup = 1 - tokens_method / tokens_baseline``. A curve that never reaches the target is censored:
its tokens are NaN and its speed-up is reported as not reached, never as a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def ema(values: Sequence[float], weight: float) -> np.ndarray:
    """Exponential moving average s_i = weight * s_{i-1} + (1 - weight) * v_i, with s_0 = v_0
    (TensorBoard's smoothing; weight 0 = no smoothing)."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    v = np.asarray(values, dtype=np.float64)
    out = np.empty_like(v)
    for i, x in enumerate(v):
        out[i] = x if i == 0 else weight * out[i - 1] + (1 - weight) * x
    return out


def tokens_to_target(tokens: Sequence[float], loss: Sequence[float], target: float) -> float:
    """First point where ``loss`` (already smoothed) is <= ``target``, interpolated linearly between the
    evaluation points around the crossing; NaN when it never gets there."""
    t, y = np.asarray(tokens, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    hit = np.flatnonzero(y <= target)
    if len(hit) == 0:
        return math.nan
    i = int(hit[0])
    if i == 0:
        return float(t[0])
    frac = (y[i - 1] - target) / (y[i - 1] - y[i])
    return float(t[i - 1] + frac * (t[i] - t[i - 1]))


def area_under_curve(tokens: Sequence[float], loss: Sequence[float]) -> float:
    """Mean loss over the run: the trapezoid area under the curve divided by the token range."""
    t, y = np.asarray(tokens, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if len(t) < 2 or t[-1] <= t[0]:
        raise ValueError("area_under_curve needs at least two evaluation points")
    return float(np.sum((y[1:] + y[:-1]) * np.diff(t)) / 2 / (t[-1] - t[0]))


def curve_metrics(tokens: Sequence[float], loss: Sequence[float], baseline_tokens: Sequence[float],
                  baseline_loss: Sequence[float], smoothing: float) -> dict[str, float]:
    """Every convergence metric of one curve against its seed's baseline curve."""
    target = float(ema(baseline_loss, smoothing)[-1])
    mine = tokens_to_target(tokens, ema(loss, smoothing), target)
    base = tokens_to_target(baseline_tokens, ema(baseline_loss, smoothing), target)
    return {"target": target, "tokens_to_target": mine, "baseline_tokens_to_target": base,
            "speedup": 1.0 - mine / base if math.isfinite(mine) and base > 0 else math.nan,
            "reached": float(math.isfinite(mine)), "auc": area_under_curve(tokens, loss),
            "final_loss": float(np.asarray(loss, dtype=np.float64)[-1])}


def paired_ci(diffs: Sequence[float], level: float = 0.95, n_resamples: int = 10_000,
              seed: int = 0) -> dict[str, float]:
    """Mean of paired differences with a percentile bootstrap interval over the pairs (seeds; scipy's
    ``bootstrap``) and the t-interval beside it. With 3 seeds the bootstrap can take only 10 distinct
    means, so both are reported; NaN entries (censored pairs) are dropped and counted."""
    from scipy import stats

    from common.stats import mean_ci

    d = np.asarray(diffs, dtype=np.float64)
    kept = d[np.isfinite(d)]
    out = {"n": int(len(kept)), "n_missing": int(len(d) - len(kept)), "mean": math.nan,
           "boot_low": math.nan, "boot_high": math.nan, "t_low": math.nan, "t_high": math.nan, "std": math.nan}
    if len(kept) == 0:
        return out
    t = mean_ci(kept.tolist(), level)
    out.update(mean=t["mean"], std=t["std"], t_low=t["low"], t_high=t["high"])
    if len(kept) > 1 and np.ptp(kept) > 0:
        res = stats.bootstrap((kept,), np.mean, confidence_level=level, n_resamples=n_resamples,
                              method="percentile", random_state=np.random.default_rng(seed))
        out.update(boot_low=float(res.confidence_interval.low), boot_high=float(res.confidence_interval.high))
    else:  # one pair, or all equal: the interval is the point
        out.update(boot_low=out["mean"], boot_high=out["mean"])
    return out


def resolved(ci: dict[str, float]) -> str:
    """'better' / 'worse' / 'unresolved' for a difference where negative is better (losses, tokens), by
    the t-interval (the wider of the two at 3 seeds); 'censored' when some pairs have no value (a run that
    never reached the target): dropping them would keep only the arm's good seeds, so no verdict is drawn."""
    if ci.get("n_missing", 0) > 0:
        return "censored"
    if not (math.isfinite(ci["t_low"]) and math.isfinite(ci["t_high"])) or ci["n"] < 2:
        return "unresolved"
    if ci["t_high"] < 0:
        return "better"
    if ci["t_low"] > 0:
        return "worse"
    return "unresolved"

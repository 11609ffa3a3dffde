"""Small statistics shared by the experiments' summary tables."""

from __future__ import annotations

import math

from scipy import stats


def mean_ci(values: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sample std, standard error and the t-interval (degenerate, i.e. the mean, when n = 1)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    se = std / math.sqrt(n)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * se if n > 1 else 0.0
    return {"mean": mean, "std": std, "se": se, "low": mean - half, "high": mean + half, "n": n}

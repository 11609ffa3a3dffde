"""The interval sweep's empirical optimum: paired differences over seeds with t-intervals, and the set of grid
points not resolved from the best (issue 16, item 16), on hand-made TOR matrices (no training)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from exp_tor.config import HarnessStageConfig
from exp_tor.harness.experiment import _log_sweep_optimum, paired_to_best

INTERVALS = [5, 12, 30, 75, 190]
# seeds × intervals: 30 and 75 are close (their paired difference is not resolved), 5 and 190 clearly worse
OBSERVED = np.array([[0.40, 0.55, 0.62, 0.58, 0.35],
                     [0.42, 0.57, 0.60, 0.61, 0.37],
                     [0.39, 0.54, 0.66, 0.62, 0.33],
                     [0.41, 0.56, 0.63, 0.62, 0.36]])


class Rows:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, table: str, method: str, metric: str, value: float, **kw) -> None:
        self.rows.append({"table": table, "method": method, "metric": metric, "value": value, **kw})

    def get(self, table: str, method: str | None = None, metric: str | None = None) -> list[dict]:
        return [r for r in self.rows if r["table"] == table and method in (None, r["method"])
                and metric in (None, r["metric"])]


def test_paired_differences_match_scipy():
    out = paired_to_best(OBSERVED, INTERVALS)
    assert out["best"] == 30   # highest seed mean
    for i, g in enumerate(INTERVALS):
        d = OBSERVED[:, 2] - OBSERVED[:, i]
        if g == 30:
            assert out["diffs"][g]["mean"] == 0 and not out["diffs"][g]["resolved"]
            continue
        ci = stats.ttest_rel(OBSERVED[:, 2], OBSERVED[:, i]).confidence_interval(0.95)
        assert out["diffs"][g]["mean"] == pytest.approx(d.mean(), rel=1e-12)
        assert out["diffs"][g]["se"] == pytest.approx(d.std(ddof=1) / 2, rel=1e-12)
        assert (out["diffs"][g]["low"], out["diffs"][g]["high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
        assert out["diffs"][g]["resolved"] == (ci.low > 0)
    assert out["optimal_set"] == [30, 75]


def test_one_seed_resolves_nothing():
    out = paired_to_best(OBSERVED[:1], INTERVALS)
    assert out["optimal_set"] == INTERVALS


def _sweep(observed: np.ndarray) -> list[SimpleNamespace]:
    # per-run estimates as in a quick sweep: δ 0.125 s, R 1 s, 35 ms steps -> predicted optimum ≈ 22 steps
    return [SimpleNamespace(tor=float(t), delta=0.125, repair=1.0, startup=0.5, t_step_opt=0.035)
            for row in observed for t in row]


@pytest.mark.parametrize("observed", [OBSERVED, OBSERVED[:, [0, 1, 3, 2, 4]]], ids=["best_is_nearest", "best_is_75"])
def test_optimum_rows_report_the_paired_difference_and_the_unresolved_set(observed):
    cfg = HarnessStageConfig(sweep_intervals=INTERVALS, sweep_fault_seeds=[1, 2, 3, 4], sweep_steps=600,
                             sweep_mtbf_s=3.0)
    rows = Rows()
    summary = _log_sweep_optimum(rows, cfg, _sweep(observed))["optimum"]
    opt = "harness_interval_optimum"
    best = INTERVALS[int(np.argmax(observed.mean(axis=0)))]
    (short,) = rows.get(opt, "nearest_to_predicted", "tor_shortfall")
    nearest = short["params"]["nearest_steps"]
    assert nearest == 30   # log-nearest grid point to the ≈ 22-step prediction
    diff = observed[:, INTERVALS.index(best)] - observed[:, INTERVALS.index(nearest)]
    assert short["value"] == pytest.approx(diff.mean(), abs=1e-12)
    if nearest == best:
        # the shortfall is 0 by construction: no standard error of 0 pretending to be a measurement
        assert short["stderr"] is None and not rows.get(opt, "nearest_to_predicted", "tor_shortfall_ci95_low")
    else:
        ci = stats.ttest_rel(observed[:, INTERVALS.index(best)], observed[:, INTERVALS.index(nearest)]) \
            .confidence_interval(0.95)
        assert short["stderr"] == pytest.approx(diff.std(ddof=1) / 2, rel=1e-9)
        (low,) = rows.get(opt, "nearest_to_predicted", "tor_shortfall_ci95_low")
        (high,) = rows.get(opt, "nearest_to_predicted", "tor_shortfall_ci95_high")
        assert (low["value"], high["value"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    # no grid point is called "the" empirical optimum: the best mean is flagged unresolved, the set is logged
    assert not rows.get(opt, "empirical_peak")
    (bm,) = rows.get(opt, "empirical_best_mean")
    assert bm["value"] == best and bm["params"]["resolved"] is False
    members = sorted(r["value"] for r in rows.get(opt, "empirical_optimal_set"))
    assert members == [30, 75] == sorted(summary["empirical_optimal_set"])
    (inset,) = rows.get(opt, "nearest_to_predicted", "in_optimal_set")
    assert inset["value"] == 1
    # one paired row per grid point, with its interval for every point other than the best
    paired = rows.get("harness_interval_paired", metric="tor_diff_to_best")
    assert sorted(r["params"]["checkpoint_every"] for r in paired) == INTERVALS
    assert len(rows.get("harness_interval_paired", metric="ci95_low")) == len(INTERVALS) - 1
    resolved = {r["params"]["checkpoint_every"]: r["value"] for r in rows.get("harness_interval_paired",
                                                                             metric="resolved")}
    assert resolved == {g: int(g not in (30, 75)) for g in INTERVALS}

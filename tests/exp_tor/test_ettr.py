"""Meta's ETTR (Kokolis et al., arXiv 2410.21680) next to TOR on the planner's inputs; failure-rate sensitivity;
the Llama-3 row read as a wall-clock MTBF (issue 16, item 17)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from common.results import load_results
from exp_tor import planning, run, tor
from exp_tor import simulate as sim
from exp_tor.config import PlanningConfig

TINY = ["sim.n_cycles=1000", "sim.taus=[30.0]", "sim.mtbfs=[180.0]", "closed.curve_points=5"]


def test_ettr_hand_computed():
    # Δt_cp = 30 min, w_cp = 1 min, u0 = 10 min, MTBF 10 h: (1 − (600 + 900)/36000) / (1 + 60/1800) = 115/124
    want = (1 - Fraction(600 + 900, 36000)) / (1 + Fraction(60, 1800))
    assert want == Fraction(115, 124)
    assert float(tor.ettr_meta(1800.0, 60.0, 600.0, 1 / 36000)) == pytest.approx(float(want), rel=1e-14)
    # no failures: only the checkpoint overhead Δt/(Δt + w) is left; huge rates clip at 0
    assert float(tor.ettr_meta(1800.0, 60.0, 600.0, 0.0)) == pytest.approx(1800 / 1860, rel=1e-14)
    assert float(tor.ettr_meta(1800.0, 60.0, 600.0, 1.0)) == 0.0


def test_ettr_matches_the_simulator_in_the_small_rate_limit():
    """Overhead beyond checkpointing, 1 − TOR·(τ+δ)/τ: ETTR charges (u0 + τ/2)/M; the simulated process pays
    (R + (τ+δ)/2)/M to first order (rollback is uniform over the whole period). So at small rates they agree
    up to δ/(2M) and second-order terms; at a high rate ETTR's first-order form is far off."""
    tau, delta, repair = 30.0, 1.0, 10.0
    for mtbf in (3_000.0, 30_000.0):
        r = sim.simulate_fail_stop(tau, delta, repair, mtbf, 400_000, seed=11)
        ov_sim, se = 1 - r.tor * (tau + delta) / tau, r.se * (tau + delta) / tau
        ov_ettr = 1 - float(tor.ettr_meta(tau, delta, repair, 1 / mtbf)) * (tau + delta) / tau
        assert ov_ettr == pytest.approx((repair + tau / 2) / mtbf, rel=1e-9)
        second_order = ((tau + delta + repair) / mtbf) ** 2
        assert abs(ov_sim - (ov_ettr + delta / (2 * mtbf))) <= 3 * se + second_order, (mtbf, ov_sim, ov_ettr)
    r = sim.simulate_fail_stop(tau, delta, repair, 60.0, 200_000, seed=12)
    assert float(tor.ettr_meta(tau, delta, repair, 1 / 60.0)) < r.tor - 0.05


def test_measured_mttf_is_a_higher_rate_than_rsc1():
    cfg = PlanningConfig()
    rate = planning.rate_from_mttf(7.9, 1024, 8)
    assert rate == pytest.approx(1000 * 24 / (7.9 * 128), rel=1e-12)
    # the planner's MTBF at 1,024 GPUs over Meta's measured 7.9 h: ≈ 3.65
    planner_h = 24 / (128 * 6.50 / 1000)
    assert rate / cfg.failures_per_1000_node_days == pytest.approx(planner_h / 7.9, rel=1e-12)
    assert 3.6 < planner_h / 7.9 < 3.7
    scen = planning.rate_scenarios(cfg)
    assert scen["measured_mttf_7.9h_at_1024gpus"] == pytest.approx(rate)
    assert scen["rsc1_x1"] == cfg.failures_per_1000_node_days


def test_planning_stage_writes_ettr_and_sensitivity_rows():
    assert run.main(["--profile", "quick", "--stage", "planning", *TINY]) == 0
    df = load_results()
    d = df[df["table"] == "tor_vs_ettr"]
    cfg = PlanningConfig()
    assert set(d["method"]) == {"tor_exact", "tor_first_order", "ettr"}
    assert set(d["p.rate_scenario"]) == set(planning.rate_scenarios(cfg))
    assert len(d) == 3 * len(cfg.cluster_sizes) * (len(cfg.rate_multipliers) + 1)
    e = d[(d["method"] == "ettr") & (d["p.mtbf_h"] * 3600 > cfg.repair_s)]
    assert (d[(d["p.mtbf_h"] * 3600 <= cfg.repair_s)]["value"] == 0).all()   # MTBF below repair: no progress
    # the ETTR rows are Meta's formula on the row's own inputs (written out here, not via tor.ettr_meta)
    lam = 1 / (e["p.mtbf_h"] * 3600)
    want = (1 - lam * (e["p.u0_s"] + e["p.tau_s"] / 2)) / (1 + e["p.delta_s"] / e["p.tau_s"])
    np.testing.assert_allclose(e["value"], want.clip(0, 1), rtol=1e-12)
    # sensitivity: at every size, TOR falls as the failure rate rises (until it is 0)
    t = d[d["method"] == "tor_exact"]
    for _, g in t.groupby("p.gpus"):
        v = g.sort_values("p.failures_per_1000_node_days")["value"].to_numpy()
        assert ((np.diff(v) < 0) | (v[1:] == 0)).all()
    meas = d[d["p.rate_scenario"] == "measured_mttf_7.9h_at_1024gpus"]
    assert meas["p.rate_vs_rsc1"].iloc[0] == pytest.approx(24 / (128 * 6.5e-3) / 7.9, rel=1e-9)


def test_llama3_row_is_read_as_wall_clock():
    """Llama 3's 185.6 min (54 d / 419 interruptions) is a wall-clock mean: at the Daly interval with δ = 5,
    R = 10 min the research note's table gives TOR 0.737 (read as uptime it would be ≈ 0.744)."""
    assert run.main(["--profile", "quick", "--stage", "closed", *TINY]) == 0
    df = load_results()
    row = df[(df["table"] == "tor_optimal_interval") & (df["method"] == "daly") & (df["metric"] == "tor_exact")
             & (df["p.mtbf"] == 185.6)]
    assert len(row) == 1 and row["p.mtbf_kind"].iloc[0] == "wallclock"
    assert row["value"].iloc[0] == pytest.approx(0.737, abs=2e-3)
    assert row["p.mtbf_uptime"].iloc[0] < 185.6 - 10 + 1e-9   # uptime MTBF is below wall clock − R
    daly = df[(df["table"] == "tor_optimal_interval") & (df["method"] == "daly") & (df["metric"] == "tau_opt")]
    uptime = daly[daly["p.mtbf_kind"] == "uptime"].sort_values("p.mtbf")
    np.testing.assert_allclose(uptime["value"], [9.14, 56.71, 116.69], atol=0.006)   # Daly's worked examples

"""Simulator: agreement with the exact closed forms (≤ 3 SE), stage invariant, loop cross-check, replay, CSV."""

import numpy as np
import pytest

from exp_tor import simulate as sim
from exp_tor import tor

GRID = [(tau, m) for tau in (10.0, 30.0, 90.0) for m in (60.0, 180.0, 720.0)]


@pytest.mark.parametrize("variant", [{}, {"commit": 4.0}, {"repair_interruptible": True}])
def test_simulator_matches_exact_within_3se(variant):
    for i, (tau, m) in enumerate(GRID):
        r = sim.simulate_fail_stop(tau, 1.0, 10.0, m, 100_000, seed=100 + i, **variant)
        exact = float(tor.fail_stop_exact(tau, 1.0, 10.0, m, **variant))
        assert abs(r.tor - exact) <= 3 * r.se, (tau, m, variant, r.tor, exact, r.se)
        assert r.ci95[0] < r.tor < r.ci95[1]


def test_breakdown_matches_simulated_stages():
    r = sim.simulate_fail_stop(30.0, 1.0, 10.0, 180.0, 200_000, seed=3)
    b = tor.fail_stop_breakdown(30.0, 1.0, 10.0, 180.0)
    for k in sim.STOP_STAGES:
        assert r.stages[k] / r.t_obs == pytest.approx(float(b[k]), abs=3e-3)
    assert sum(r.stages.values()) == pytest.approx(r.t_obs, rel=1e-12)


def test_fail_slow_matches_closed_form():
    for policy in ("tolerate", "ckpt_restart"):
        r = sim.simulate_fail_slow(600.0, 0.6, 20.0, 12.0, policy, 100_000, seed=5)
        assert abs(r.tor - float(tor.fail_slow(600.0, 0.6, 20.0, 12.0, policy))) <= 3 * r.se


def test_stage_invariant_is_checked():
    st = sim.fail_stop_cycle_stages(np.array([0.5, 31.5, 95.0]), 30.0, 1.0, 1.0, np.full(3, 10.0))
    sim.check_invariant(st, np.array([0.5, 31.5, 95.0]) + 10.0)
    with pytest.raises(AssertionError, match="sum"):
        sim.check_invariant(st, np.array([0.5, 31.5, 96.0]) + 10.0)
    np.testing.assert_allclose(st["useful"], [0, 30, 90])
    np.testing.assert_allclose(st["checkpoint"], [0, 1, 3])


def test_vectorised_equals_per_event_loop():
    for commit in (1.0, 3.0):
        a = sim.simulate_fail_stop(20.0, 1.0, 5.0, 50.0, 5_000, seed=9, commit=commit)
        b = sim.loop_fail_stop_cycles(20.0, 1.0, 5.0, 50.0, 5_000, seed=9, commit=commit)
        assert a.tor == pytest.approx(b.tor, rel=1e-12)
        for k in sim.STOP_STAGES:
            assert a.stages[k] == pytest.approx(b.stages[k], rel=1e-9)


def test_non_exponential_runs_and_differs():
    e = sim.simulate_fail_stop(30.0, 1.0, 10.0, 180.0, 50_000, seed=1)
    w = sim.simulate_fail_stop(30.0, 1.0, 10.0, 180.0, 50_000, seed=1, dist="weibull", shape=0.7)
    ln = sim.simulate_fail_stop(30.0, 1.0, 10.0, 180.0, 50_000, seed=1, dist="lognormal", shape=1.0)
    for r in (w, ln):
        assert 0 < r.tor < 1 and abs(r.tor - e.tor) > 3 * max(r.se, e.se)
    x = sim.sample_uptimes(np.random.default_rng(0), 200_000, 50.0, "weibull", 0.7)
    assert x.mean() == pytest.approx(50.0, rel=0.02)
    with pytest.raises(ValueError, match="distribution"):
        sim.sample_uptimes(np.random.default_rng(0), 3, 1.0, "pareto")


def test_job_simulator_agrees_with_closed_form():
    tors = [sim.simulate_job(20_000.0, 30.0, 1.0, 10.0, mtbf=180.0, seed=s).tor for s in range(30)]
    mean, se = np.mean(tors), np.std(tors, ddof=1) / np.sqrt(len(tors))
    assert abs(mean - float(tor.fail_stop_exact(30.0, 1.0, 10.0, 180.0))) <= 3 * se + 2e-3  # + finite-job bias


def test_trace_replay_by_hand():
    ev = [sim.FaultEvent(50.0, "fail_stop")]
    j = sim.simulate_job(100.0, 30.0, 1.0, 10.0, events=ev)
    assert j.t_obs == pytest.approx(132.0)
    assert j.stages["lost"] == pytest.approx(19.0) and j.stages["repair"] == pytest.approx(10.0)
    assert j.stages["checkpoint"] == pytest.approx(3.0) and j.n_fail_stop == 1
    j = sim.simulate_job(20.0, 1e9, 0.0, 10.0, events=[sim.FaultEvent(0.0, "fail_slow", 0.5, 10.0)])
    assert j.t_obs == pytest.approx(25.0) and j.stages["slow"] == pytest.approx(10.0)
    assert sim.replay_harness(100.0, 30.0, 1.0, 10.0, 2.0, 1.0, [{"time": 52.0}], []) == pytest.approx(100 / 134)


def test_trace_csv_roundtrip_and_errors(tmp_path):
    good = tmp_path / "t.csv"
    good.write_text("time,kind,rho,duration\n50,fail_stop,,\n200,fail_slow,0.5,10\n")
    ev = sim.load_trace(good)
    assert [e.kind for e in ev] == ["fail_stop", "fail_slow"] and ev[1].rho == 0.5
    for body, msg in (("when,kind\n1,fail_stop\n", ":1: header"), ("time,kind\n1,fail_stop\nx,fail_stop\n", ":3:"),
                      ("time,kind\n1,crash\n", ":2: kind"), ("time,kind\n-1,fail_stop\n", ":2: time"),
                      ("time,kind,rho\n1,fail_slow,2\n", ":2:")):
        bad = tmp_path / "bad.csv"
        bad.write_text(body)
        with pytest.raises(ValueError, match=f"bad.csv{msg}"):
            sim.load_trace(bad)
    with pytest.raises(ValueError, match="not found"):
        sim.load_trace(tmp_path / "missing.csv")


def test_slow_policies_by_hand():
    ev = [sim.FaultEvent(40.0, "fail_slow", 0.5, 10.0)]
    stop = sim.simulate_job(100.0, 30.0, 1.0, 10.0, events=ev, policy="treat_as_stop")
    assert stop.t_obs == pytest.approx(132.0) and stop.stages["lost"] == pytest.approx(19.0)
    mit = sim.simulate_job(100.0, 30.0, 1.0, 10.0, events=ev, policy="ckpt_restart", mitigation=3.0)
    # 0-30 work, ckpt to 31, 31-40 (9), slow 40-50 (5), mitigation to 53 (44 durable), 53-83 (74), ckpt, 84-110
    assert mit.t_obs == pytest.approx(110.0)
    assert mit.stages["lost"] == 0.0 and mit.stages["mitigation"] == pytest.approx(3.0)
    assert mit.tor > stop.tor

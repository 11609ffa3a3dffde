"""Closed forms: Daly's worked examples, research-note test vectors, limits, monotonicity, range."""

import numpy as np
import pytest

from exp_tor import tor


def test_daly_worked_examples():
    taus = tor.daly_interval(5.0, np.array([1440.0, 360.0, 15.0]))
    np.testing.assert_allclose(taus, [116.69, 56.71, 9.14], atol=0.006)
    np.testing.assert_allclose(tor.young_interval(5.0, [1440.0, 360.0]), [120.0, 60.0])
    # numeric argmax of the exact (Daly) TOR: 116.69 / 56.71 / 9.17
    num = tor.numeric_interval(5.0, 10.0, np.array([1440.0, 360.0, 15.0]), repair_interruptible=True)
    np.testing.assert_allclose(num, [116.69, 56.71, 9.17], atol=0.01)


def test_note_tor_vectors():
    m = np.array([1440.0, 360.0, 15.0, 185.6])
    d = np.array([5.0, 5.0, 5.0, 1.0])
    t = tor.daly_interval(d, m)
    np.testing.assert_allclose(tor.fail_stop_exact(t, d, 10.0, m, repair_interruptible=True),
                               [0.91261, 0.81938, 0.19967, 0.85255], atol=2e-5)
    np.testing.assert_allclose(tor.fail_stop_first_order(t, d, 10.0, m), [0.91206, 0.81750, 0.20503, 0.85291],
                               atol=2e-5)
    assert tor.fail_stop_first_order(30, 1, 10, 180) == pytest.approx(0.8379, abs=1e-4)
    assert tor.fail_stop_exact(30, 1, 10, 180) == pytest.approx(0.8401, abs=1e-4)
    assert tor.fail_slow(600, 0.6, 20, 12, "ckpt_restart") == pytest.approx(0.9684, abs=1e-4)


LLAMA3_TABLE = {(1 / 6, 2.0): 0.948, (1 / 6, 5.0): 0.932, (1 / 6, 10.0): 0.904, (1 / 6, 20.0): 0.847,
                (1.0, 2.0): 0.890, (1.0, 5.0): 0.874, (1.0, 10.0): 0.847, (1.0, 20.0): 0.792,
                (5.0, 2.0): 0.776, (5.0, 5.0): 0.761, (5.0, 10.0): 0.737, (5.0, 20.0): 0.686}


def test_llama3_wallclock_table():
    """Research-note table (Daly model, wall-clock MTBF 54 d/419 min at the Daly interval). The note converts
    with M_up = M_wall − R; our exact conversion (M_wall = M_up·e^{R/M_up}) differs by < 2e-3."""
    m_wall = 54 * 24 * 60 / 419
    for (delta, repair), want in LLAMA3_TABLE.items():
        m_up = m_wall - repair
        got = tor.fail_stop_exact(tor.daly_interval(delta, m_up), delta, repair, m_up, repair_interruptible=True)
        assert got == pytest.approx(want, abs=6e-4)
        m_up = tor.uptime_mtbf(m_wall, repair, "wallclock", repair_interruptible=True)
        got = tor.fail_stop_exact(tor.daly_interval(delta, m_up), delta, repair, m_wall, "wallclock",
                                  repair_interruptible=True)
        assert got == pytest.approx(want, abs=2e-3)


def test_limits_and_range():
    tau, delta = 30.0, 2.0
    for f in (tor.fail_stop_exact, tor.fail_stop_first_order):
        assert f(tau, delta, 10.0, np.inf) == pytest.approx(tau / (tau + delta))
        assert f(tau, delta, 10.0, 1e12) == pytest.approx(tau / (tau + delta), rel=1e-6)
        assert f(tau, 0.0, 10.0, 1e12) == pytest.approx(1.0, rel=1e-6)
    grid = np.meshgrid(np.geomspace(0.1, 1e4, 9), np.geomspace(0.01, 100, 5), np.geomspace(0.1, 1e3, 5),
                       np.geomspace(1, 1e5, 7), indexing="ij")
    for f in (tor.fail_stop_exact, tor.fail_stop_first_order):
        v = f(*grid)
        assert v.shape == grid[0].shape and np.all((v >= 0) & (v <= 1))


def test_monotone():
    r = np.linspace(0, 100, 50)
    assert np.all(np.diff(tor.fail_stop_exact(30, 1, r, 180)) < 0)
    d = np.linspace(0, 20, 50)
    assert np.all(np.diff(tor.fail_stop_exact(30, d, 10, 180)) < 0)
    m = np.geomspace(10, 1e5, 50)                       # failure rate falls as M grows
    assert np.all(np.diff(tor.fail_stop_exact(30, 1, 10, m)) > 0)
    assert np.all(np.diff(tor.fail_stop_first_order(30, 1, 10, m)) >= 0)  # clipped at 0 when M is tiny


def test_breakdown_sums_and_matches():
    b = tor.fail_stop_breakdown(30.0, 1.0, 10.0, np.array([60.0, 180.0]))
    np.testing.assert_allclose(sum(b.values()), 1.0)
    np.testing.assert_allclose(b["useful"], tor.fail_stop_exact(30.0, 1.0, 10.0, [60.0, 180.0]))


def test_async_and_optimum_relations():
    base = tor.fail_stop_exact(30, 1, 10, 180)
    assert tor.fail_stop_exact(30, 1, 10, 180, commit=5) < base
    with pytest.raises(ValueError):
        tor.fail_stop_exact(30, 2, 10, 180, commit=1)
    # R does not move the optimum of the exact form; first-order optimum is √(2δM) − δ
    t1 = tor.numeric_interval(1.0, 0.0, 500.0)
    t2 = tor.numeric_interval(1.0, 50.0, 500.0)
    assert t1 == pytest.approx(t2, rel=1e-4)
    assert tor.tor_first_order_interval(1.0, 500.0) == pytest.approx(np.sqrt(1000) - 1)
    step = tor.numeric_interval(1.0, 10.0, 500.0, step_time=7.0)
    assert step % 7.0 == pytest.approx(0.0, abs=1e-9) and abs(step - t1) <= 7.0
    assert tor.availability_interval(1.0, 500.0, 0.0) > tor.young_interval(1.0, 500.0) - 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="mtbf_kind"):
        tor.fail_stop_exact(30, 1, 10, 180, mtbf_kind="weekly")
    with pytest.raises(ValueError, match="policy"):
        tor.fail_slow(600, 0.5, 10, policy="ignore")
    with pytest.raises(ValueError, match="repair"):
        tor.fail_stop_exact(30, 1, 200, 180, mtbf_kind="wallclock")


def test_combined_and_estimates():
    c = tor.combined(30, 1, 10, 180, 600, 0.6, 20, 12, "ckpt_restart")
    assert c == pytest.approx(float(tor.fail_stop_exact(30, 1, 10, 180)) * 0.96835, abs=1e-4)
    assert tor.tor_from_estimates(30, 1, 10, float("inf")) == pytest.approx(30 / 31)
    assert tor.tor_from_estimates(30, 0, 10, 0.0, slow_mtbf=100, rho=0.5, slow_duration=10) == \
        pytest.approx(105 / 110)
    assert tor.predicted_t_obs(100.0, 0.5) == pytest.approx(200.0)


def test_flatness_and_warmup():
    t = tor.numeric_interval(5.0, 10.0, np.array([1440.0, 15.0]))
    f = tor.interval_flatness(t, 5.0, 10.0, np.array([1440.0, 15.0]))
    assert np.all(f["loss_low"] >= 0) and np.all(f["loss_high"] >= 0) and np.all(f["loss_low"] < 0.05)
    base = tor.fail_stop_first_order(30, 1, 10, 180)
    assert tor.fail_stop_first_order(30, 1, 10, 180, warmup=5, r_warmup=0.0) == \
        pytest.approx(tor.fail_stop_first_order(30, 1, 15, 180))                      # r_w = 0: extra repair
    assert tor.fail_stop_first_order(30, 1, 10, 180, warmup=5, r_warmup=0.5) < base
    assert tor.fail_stop_first_order(30, 1, 10, 180, warmup=5, r_warmup=0.5) < \
        tor.fail_stop_first_order(30, 1, 10, 180, warmup=5, r_warmup=1.0)
    assert tor.stage_tor([30.0, 1.0, 10.0], [1.0, 0.0, 0.0], lost=5.0) == pytest.approx(25 / 41)

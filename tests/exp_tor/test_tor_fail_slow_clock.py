"""Fail-slow windows on the training clock (issue 16, item 17): drawn at the intended rate, mapped to the job
clock by hand-checkable arithmetic, and — in the quick profile's validation job — falling on training steps,
so that rho is observable."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.config import build_config
from exp_tor.config import Config
from exp_tor.harness.analyze import analyze, job_clock_windows, load_events, training_segments
from tests.conftest import REPO


def _onsets_vs_poisson(windows: list[dict], horizon: float, slow_mtbf: float) -> tuple[int, float]:
    """(onsets before ``horizon``, expected count). Onsets are a Poisson process of rate 1/slow_mtbf on the
    *healthy* training time (the clock minus the windows, which last D each), so given the healthy time H
    before the horizon the count is Poisson with mean H / slow_mtbf: its variance is that mean too."""
    starts = [w["start"] for w in windows if w["start"] < horizon]
    in_windows = sum(min(w["duration"], horizon - w["start"]) for w in windows if w["start"] < horizon)
    return len(starts), (horizon - in_windows) / slow_mtbf


def test_windows_are_drawn_at_the_intended_rate():
    from exp_tor.harness.supervisor import HarnessConfig, slow_windows

    cfg = HarnessConfig(slow_mtbf_s=5.0, slow_duration_s=2.0, slow_rho=0.5)
    horizon = 20_000.0
    w = slow_windows(cfg, horizon, np.random.default_rng(7))
    n, mean = _onsets_vs_poisson(w, horizon, cfg.slow_mtbf_s)
    assert abs(n - mean) <= 3 * math.sqrt(mean), (n, mean)   # 3 Poisson standard deviations
    starts = np.array([x["start"] for x in w])
    assert np.all(np.diff(starts) >= cfg.slow_duration_s)   # windows never overlap
    assert {x["duration"] for x in w} == {2.0} and {x["rho"] for x in w} == {0.5}


def test_training_clock_maps_to_the_job_clock_by_hand():
    # job starts at 100; attempt 0 trains 105..108 (then a fault), attempt 1 trains 112..120
    events = [{"event": "job_start", "time": 100.0}, {"event": "train_begin", "time": 105.0, "attempt": 0},
              {"event": "fault", "time": 108.0}, {"event": "train_begin", "time": 112.0, "attempt": 1},
              {"event": "train_end", "time": 120.0}, {"event": "job_end", "time": 121.0}]
    assert training_segments(events) == [(5.0, 8.0, 0.0), (12.0, 20.0, 3.0)]
    windows = [{"start": 1.0, "duration": 1.0, "rho": 0.5},     # inside attempt 0: job 6..7
               {"start": 2.0, "duration": 3.0, "rho": 0.5},     # cut by the fault: job 7..8 then 12..14
               {"start": 10.0, "duration": 2.0, "rho": 0.5},    # job 19..20, its last second past the end
               {"start": 11.5, "duration": 1.0, "rho": 0.5}]    # beyond the 11 s of training: dropped
    got = [(p["window"], p["start"], p["duration"]) for p in job_clock_windows(events, windows)]
    assert got == [(0, 6.0, 1.0), (1, 7.0, 1.0), (1, 12.0, 2.0), (2, 19.0, 1.0)]


def _training_clock(events: list[dict]):
    """t (absolute) -> training clock, from the event log alone (train_begin .. fault/train_end segments)."""
    job_start = events[0]["time"]
    segs = training_segments(events)

    def clock(t: float) -> float | None:
        for j0, j1, c in segs:
            if j0 <= t - job_start <= j1:
                return c + (t - job_start - j0)
        return None
    return clock


@pytest.mark.slow
def test_quick_validation_job_shows_fail_slow_on_training_steps(tmp_path, data_root):
    """The quick profile's validation job (cold restarts, fail-stop + fail-slow) as the harness stage runs it:
    every window that began within the training time lies on steps, the trainer stretched exactly the steps
    that overlap a window on the training clock, rho is observable, and the number of onsets matches the
    intended rate (Poisson, 3 standard deviations)."""
    from exp_tor.harness.supervisor import run_job

    job = build_config(Config, "quick", config_dir=REPO / "exp_tor" / "configs").harness.job
    assert job.slow_mtbf_s > 0 and job.restart == "cold"
    info = run_job(job, tmp_path)
    a = analyze(tmp_path)
    events = load_events(tmp_path)
    uptime = sum(j1 - j0 for j0, j1, _ in training_segments(events))
    windows = info["fail_slow"]
    hit = [w for w in windows if w["start"] < uptime]
    assert a.n_fail_slow == len(hit) >= 1
    assert a.n_slow_steps >= 1 and a.rho < 1.0 and a.stages["slow_deficit"] > 0   # rho observable
    # every window that began in the training time has a piece on the job clock inside a training segment
    assert {p["window"] for p in info["fail_slow_job_clock"]} == set(range(len(hit)))
    # the trainer decides "slow" between the previous event of its attempt and the step's end: that span,
    # on the training clock, overlaps a window for every slow step; a healthy step's span lies outside them
    clock = _training_clock(events)
    trainer = [e for e in events if e["src"] == "trainer"]
    n_slow = 0
    for prev, e in zip(trainer, trainer[1:]):
        if e["event"] != "step_end" or prev["attempt"] != e["attempt"]:
            continue
        c0, c1 = clock(prev["time"]), clock(e["time"])
        if c0 is None or c1 is None:   # logged after the fault, before the SIGKILL landed: off the clock
            continue
        overlaps = any(w["start"] < c1 and c0 < w["start"] + w["duration"] for w in windows)
        inside = any(w["start"] <= c0 and c1 < w["start"] + w["duration"] for w in windows)
        if e["slow"]:
            n_slow += 1
            assert overlaps, (e, c0, c1)
        else:
            assert not inside, (e, c0, c1)
    assert n_slow >= a.n_slow_steps
    n, mean = _onsets_vs_poisson(windows, uptime, job.slow_mtbf_s)
    assert abs(n - mean) <= 3 * math.sqrt(mean), (n, mean, uptime)

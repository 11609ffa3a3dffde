"""The TOR harness on a real (tiny) training run: SIGKILLs, bit-exact resumption, accounting identity."""

from __future__ import annotations

import pytest

from exp_tor.harness.analyze import STAGES, analyze, check_identity, load_events, r_timeline
from exp_tor.harness.supervisor import HarnessConfig, run_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    base = dict(steps=120, checkpoint_every=20, n_seqs=512, repair_s=0.2, fault_seed=1)
    clean_dir, faulty_dir = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("faulty")
    run_job(HarnessConfig(**base), clean_dir)
    # mtbf 1.5 s of uptime, fault seed 1: the first draws kill the trainer before it can finish
    info = run_job(HarnessConfig(**base, mtbf_s=1.5, slow_mtbf_s=1.5, slow_duration_s=1.0, slow_rho=0.5),
                   faulty_dir)
    return analyze(clean_dir), analyze(faulty_dir), info, faulty_dir, base


def test_killed_run_resumes_bit_exactly(runs):
    clean, faulty, info, *_ = runs
    assert len(info["fail_stop"]) >= 1 and faulty.n_fail_stop == len(info["fail_stop"])
    assert faulty.weights_sha256 == clean.weights_sha256
    assert faulty.final_loss == clean.final_loss
    assert clean.n_fail_stop == 0 and clean.stages["lost"] == 0.0


def test_every_second_is_booked_once_and_identity_closes(runs):
    _, faulty, _, run_dir, _ = runs
    assert set(faulty.stages) == set(STAGES)
    assert sum(faulty.stages.values()) == pytest.approx(faulty.T_obs, rel=1e-9)
    assert faulty.stages["useful"] == pytest.approx(faulty.T_opt)
    assert faulty.stages["repair"] > 0 and faulty.stages["lost"] >= 0
    check_identity(faulty, rel_tol=0.05)
    assert 0 < faulty.tor < 1 and faulty.n_steps == 120
    # ∫ r dt over the timeline equals T_opt (r = t_opt / step duration on surviving steps, 0 elsewhere)
    tl = r_timeline(faulty, n_bins=50)
    width = faulty.T_obs / 50
    assert sum(r for _, r in tl) * width == pytest.approx(faulty.T_opt, rel=1e-6)
    events = load_events(run_dir)
    assert [e["event"] for e in events].count("fault") == faulty.n_fail_stop


def test_estimates_are_consistent_with_injection(runs):
    clean, faulty, info, *_ = runs
    assert faulty.delta > 0 and faulty.tau == pytest.approx(20 * faulty.t_step_opt)
    assert faulty.repair >= 0.2  # at least the injected repair sleep
    if faulty.n_slow_steps:  # a window may fall wholly in a repair or on rolled-back steps
        assert 0.3 < faulty.rho < 0.7  # injected 0.5 (sleep granularity and logging blur it)
    else:
        assert faulty.rho == 1.0 and faulty.stages["slow_deficit"] == 0.0


def test_warm_restart_resumes_bit_exactly_and_starts_faster(runs, tmp_path):
    """Attempts forked from the preloaded forkserver: same final weights, restart cost measured."""
    clean, faulty_cold, *_, base = runs
    info = run_job(HarnessConfig(**base, mtbf_s=1.0, restart="warm"), tmp_path)
    warm = analyze(tmp_path)
    assert len(info["fail_stop"]) >= 1 and warm.n_fail_stop == len(info["fail_stop"])
    assert warm.weights_sha256 == clean.weights_sha256 and warm.final_loss == clean.final_loss
    check_identity(warm, rel_tol=0.05)
    # repair = detection + injected sleep + restart up to the first step; a warm restart skips the imports
    assert base["repair_s"] <= warm.repair < faulty_cold.repair


def test_bad_restart_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="restart"):
        run_job(HarnessConfig(restart="hot"), tmp_path)


def test_corrupt_event_log_names_the_line(tmp_path):
    (tmp_path / "supervisor_events.jsonl").write_text('{"event": "job_start", "time": 1}\nnot json\n')
    (tmp_path / "trainer_events.jsonl").write_text("")
    with pytest.raises(ValueError, match="supervisor_events.jsonl:2"):
        load_events(tmp_path)
    (tmp_path / "supervisor_events.jsonl").write_text('{"event": "job_start", "time": 1}\n')
    with pytest.raises(ValueError, match="job_start..job_end"):
        analyze(tmp_path)

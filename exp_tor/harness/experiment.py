"""The harness stage of exp_tor/run.py: TOR measured on real fault-injected training runs.

1. Validation: one job with fail-stop and fail-slow faults. Rows: observed TOR; the closed form from
   the parameters estimated on the run's own event log; the simulator replaying the exact injected fault
   times; the stage breakdown; the estimates (delta, R, MTBF, rho, D); r(t).
2. Interval sweep: the same fault draws (common random numbers) at several checkpoint intervals; the
   empirical TOR peak is compared with the predicted optimum interval.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from common.results import Run
from exp_tor.config import HarnessStageConfig
from exp_tor.harness.analyze import HarnessAnalysis, analyze, check_identity, r_timeline
from exp_tor.harness.supervisor import HarnessConfig, run_job


def _log_analysis(run: Run, table: str, a: HarnessAnalysis, params: dict) -> None:
    run.log(table=table, method="observed", metric="tor", value=a.tor, params=params)
    for stage, seconds in a.stages.items():
        run.log(table=table, method="observed", metric="stage_seconds", value=seconds,
                params={**params, "stage": stage})
    for name in ("delta", "tau", "repair", "mtbf_uptime", "mtbf_wall", "rho", "slow_duration", "startup",
                 "t_step_opt", "T_opt", "T_obs", "identity_residual"):
        run.log(table=table, method="estimate", metric=name, value=getattr(a, name), params=params)


def predicted_tor(a: HarnessAnalysis, slow_mtbf_s: float) -> float:
    """Closed-form TOR of the job from its own estimated parameters (exact Poisson fail-stop form,
    uptime MTBF, repair not interruptible; fail-slow tolerated), plus the one-off start-up."""
    from exp_tor import tor

    unit = tor.tor_from_estimates(tau=a.tau, delta=a.delta, repair=a.repair, mtbf=a.mtbf_uptime,
                                  slow_mtbf=slow_mtbf_s, rho=a.rho, slow_duration=a.slow_duration)
    return a.T_opt / (a.T_opt / unit + a.startup)


def replayed_tor(a: HarnessAnalysis, info: dict) -> float:
    """The simulator replaying the exact injected fault times with the run's estimated parameters."""
    from exp_tor import simulate

    return simulate.replay_harness(T_opt=a.T_opt, tau=a.tau, delta=a.delta, repair=a.repair,
                                   startup=a.startup, rho=a.rho, fail_stop=info["fail_stop"],
                                   fail_slow=info["fail_slow"])


def run_harness_stage(cfg: HarnessStageConfig, run: Run) -> dict:
    work = Path(cfg.work_dir)
    out: dict = {}
    vdir = work / "validation"
    shutil.rmtree(vdir, ignore_errors=True)
    info = run_job(cfg.job, vdir)
    a = analyze(vdir)
    check_identity(a, cfg.identity_tol)
    params = {"job": "validation", "checkpoint_every": cfg.job.checkpoint_every, "mtbf_s": cfg.job.mtbf_s}
    _log_analysis(run, "harness_validation", a, params)
    pred = predicted_tor(a, cfg.job.slow_mtbf_s)
    rep = replayed_tor(a, info)
    run.log(table="harness_validation", method="closed_form", metric="tor", value=pred, params=params)
    run.log(table="harness_validation", method="simulator_replay", metric="tor", value=rep, params=params)
    for t, r in r_timeline(a, 200):
        run.log(table="harness_rt", method="observed", metric="r", value=r, params={"t": round(t, 4)})
    out["validation"] = {"observed": a.tor, "closed_form": pred, "replay": rep, **a.to_dict()}

    sweep = []
    for seed in cfg.sweep_fault_seeds:
        for every in cfg.sweep_intervals:
            d = work / f"sweep_seed{seed}_every{every}"
            shutil.rmtree(d, ignore_errors=True)
            job = HarnessConfig(**{**asdict(cfg.job), "steps": cfg.sweep_steps, "checkpoint_every": every,
                                   "mtbf_s": cfg.sweep_mtbf_s, "slow_mtbf_s": 0.0, "fault_seed": seed})
            info = run_job(job, d)
            s = analyze(d)
            p = {"checkpoint_every": every, "fault_seed": seed, "mtbf_s": cfg.sweep_mtbf_s}
            _log_analysis(run, "harness_interval_sweep", s, p)
            run.log(table="harness_interval_sweep", method="closed_form", metric="tor",
                    value=predicted_tor(s, 0.0), params=p)
            sweep.append(s)
    out["sweep"] = [x.to_dict() for x in sweep]
    out.update(_log_sweep_optimum(run, cfg, sweep))
    return out


def _log_sweep_optimum(run: Run, cfg: HarnessStageConfig, sweep: list[HarnessAnalysis]) -> dict:
    """Predicted optimum interval (in steps) from the sweep's pooled estimates vs the empirical TOR peak.

    The prediction maximises the exact fail-stop TOR over whole numbers of steps, with delta and the step
    time pooled over the sweep's runs and the injected MTBF (uptime); the empirical peak is the interval
    with the highest observed TOR averaged over fault seeds."""
    from exp_tor import tor

    delta = float(np.mean([s.delta for s in sweep]))
    repair = float(np.mean([s.repair for s in sweep if s.repair > 0] or [cfg.job.repair_s]))
    t_step = float(np.mean([s.t_step_opt for s in sweep]))
    tau_opt = float(tor.numeric_interval(delta, repair, cfg.sweep_mtbf_s, step_time=t_step))
    pred_steps = max(round(tau_opt / t_step), 1)
    n_seeds = len(cfg.sweep_fault_seeds)
    by_interval = {e: float(np.mean([s.tor for s in sweep[i::len(cfg.sweep_intervals)]]))
                   for i, e in enumerate(cfg.sweep_intervals)}
    best = max(by_interval, key=by_interval.get)
    p = {"mtbf_s": cfg.sweep_mtbf_s, "n_fault_seeds": n_seeds, "delta": delta, "t_step": t_step}
    run.log(table="harness_interval_optimum", method="predicted_numeric_exact", metric="interval_steps",
            value=pred_steps, params=p)
    run.log(table="harness_interval_optimum", method="empirical_peak", metric="interval_steps", value=best, params=p)
    for method, steps in (("young", tor.young_interval(delta, cfg.sweep_mtbf_s) / t_step),
                          ("daly", tor.daly_interval(delta, cfg.sweep_mtbf_s) / t_step)):
        run.log(table="harness_interval_optimum", method=method, metric="interval_steps", value=float(steps), params=p)
    return {"optimum": {"predicted_steps": pred_steps, "empirical_peak_steps": best, "tor_by_interval": by_interval}}

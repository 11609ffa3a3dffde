"""The harness stage of exp_tor/run.py: TOR measured on real fault-injected training runs.

The jobs' run directories (event logs, checkpoints) live under ``work_dir``, which run.py makes the
stage's own output folder (``<outputs>/exp_tor/harness/<hash>/jobs``), so a rerun of the same config is
skipped and a changed config gets a fresh folder. Rows go to ``run.log(...)`` (a ``StageContext``).

1. Validation: one job with fail-stop and fail-slow faults. Rows: observed TOR; the closed form from
   the parameters estimated on the run's own event log; the simulator replaying the exact injected fault
   times; the stage breakdown; the estimates (delta, R, MTBF, rho, D); r(t).
2. Interval sweep: the same fault draws (common random numbers) at several checkpoint intervals, for
   each fault seed; the empirical TOR curve and peak are compared with the curve and optimum predicted
   from the sweep's pooled estimates.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from exp_tor.config import HarnessStageConfig
from exp_tor.harness.analyze import HarnessAnalysis, analyze, check_identity, r_timeline
from exp_tor.harness.supervisor import HarnessConfig, run_job


class RowLogger(Protocol):
    """Where the stage's rows go: a ``common.stages.StageContext`` (or a ``common.results.Run``)."""

    def log(self, table: str, method: str, metric: str, value: float, **kw: Any) -> None: ...


def _log_analysis(run: RowLogger, table: str, a: HarnessAnalysis, params: dict) -> None:
    run.log(table=table, method="observed", metric="tor", value=a.tor, params=params)
    # the same run read with the median step as T_opt/n (the former estimator): both are reported
    run.log(table=table, method="observed_median_step", metric="tor", value=a.tor_median_step, params=params)
    for stage, seconds in a.stages.items():
        run.log(table=table, method="observed", metric="stage_seconds", value=seconds,
                params={**params, "stage": stage})
    for name in ("delta", "tau", "repair", "mtbf_uptime", "mtbf_wall", "rho", "slow_duration", "startup",
                 "t_step_opt", "t_step_median", "t_step_std", "n_healthy_steps", "T_opt", "T_opt_se", "T_obs",
                 "identity_residual", "jitter_median"):
        run.log(table=table, method="estimate", metric=name, value=getattr(a, name), params=params)


def job_tor(T_opt: float, startup: float, **estimates) -> float:
    """Closed-form TOR of a whole job: the repeating-unit TOR (``tor.tor_from_estimates``: exact Poisson
    fail-stop, uptime MTBF, repair not interruptible; fail-slow tolerated) plus the one-off start-up."""
    from exp_tor import tor

    return T_opt / (T_opt / tor.tor_from_estimates(**estimates) + startup)


def predicted_tor(a: HarnessAnalysis, slow_mtbf_s: float) -> float:
    """The job's closed-form TOR from its own estimated parameters."""
    return job_tor(a.T_opt, a.startup, tau=a.tau, delta=a.delta, repair=a.repair, mtbf=a.mtbf_uptime,
                   slow_mtbf=slow_mtbf_s, rho=a.rho, slow_duration=a.slow_duration)


def replayed_tor(a: HarnessAnalysis, info: dict) -> float:
    """The simulator replaying the exact injected fault times with the run's estimated parameters (the
    fail-slow windows where they fell on the job clock: drawn on the training clock, see supervisor.py)."""
    from exp_tor import simulate

    return simulate.replay_harness(T_opt=a.T_opt, tau=a.tau, delta=a.delta, repair=a.repair,
                                   startup=a.startup, rho=a.rho, fail_stop=info["fail_stop"],
                                   fail_slow=info["fail_slow_job_clock"])


def _timeline_events(run_dir: Path, info: dict, t_obs: float) -> list[tuple[float, str, float]]:
    """(job time, kind, duration) of the validation job's faults, checkpoint saves and fail-slow windows."""
    from exp_tor.harness.analyze import load_events

    events = load_events(run_dir)
    start = events[0]["time"]
    out = [(float(f["time"]), "fault", 0.0) for f in info["fail_stop"]]
    out += [(e["time"] - start, "checkpoint", 0.0) for e in events if e["event"] == "checkpoint_begin"]
    out += [(float(w["start"]), "slow", float(w["duration"])) for w in info["fail_slow_job_clock"]
            if w["start"] < t_obs]
    return sorted(out)


def _validation_job(cfg: HarnessStageConfig, vdir: Path) -> dict:
    """Run and analyse the validation job (on whichever process got it): info, analysis, timeline marks."""
    shutil.rmtree(vdir, ignore_errors=True)
    info = run_job(cfg.job, vdir)
    a = analyze(vdir)
    check_identity(a, cfg.identity_tol)
    return {"info": info, "analysis": a, "timeline": _timeline_events(vdir, info, a.T_obs)}


def _sweep_job(cfg: HarnessStageConfig, work: Path, seed: int, every: int) -> HarnessAnalysis:
    d = work / f"sweep_seed{seed}_every{every}"
    shutil.rmtree(d, ignore_errors=True)
    job = HarnessConfig(**{**asdict(cfg.job), "steps": cfg.sweep_steps, "checkpoint_every": every,
                           "mtbf_s": cfg.sweep_mtbf_s, "slow_mtbf_s": 0.0, "fault_seed": seed,
                           "restart": cfg.sweep_restart})
    run_job(job, d)
    return analyze(d)


def run_harness_stage(cfg: HarnessStageConfig, run: RowLogger, work_dir: str | Path) -> dict:
    """Run the validation job and the interval sweep under ``work_dir``; log their rows; return a summary.

    The jobs are independent: under a multi-process launch (``run`` a ``StageContext`` with
    ``world_size`` > 1) each process runs its share (``exp_tor.distributed.run_shared``) and the main
    process, which alone logs rows, gets every result; the other processes return ``{}``. A process runs
    the validation job alone, before its sweep jobs (its timings are the validation measurement), and
    ``sweep_parallel`` sweep jobs at once. Each finished job prints a line with the elapsed time and an ETA."""
    from exp_tor.distributed import run_shared, world_of

    work = Path(work_dir)
    grid = [(seed, every) for seed in cfg.sweep_fault_seeds for every in cfg.sweep_intervals]
    jobs: list[tuple[int, int] | None] = [None, *grid]     # None = the validation job
    names = ["validation", *(f"sweep_seed{seed}_every{every}" for seed, every in grid)]

    def one(job: tuple[int, int] | None):
        return _validation_job(cfg, work / "validation") if job is None else _sweep_job(cfg, work, *job)

    # Each trainer uses one thread, so jobs can share the cores; every job's times are its own measurements.
    results = run_shared(run, jobs, one, names=names, label="exp_tor harness", parallel=cfg.sweep_parallel,
                         first_alone=True)
    rank, world = world_of(run)
    if rank != 0:
        return {}
    val, sweep = results[0], results[1:]
    info, a = val["info"], val["analysis"]
    out: dict = {}
    params = {"job": "validation", "checkpoint_every": cfg.job.checkpoint_every, "mtbf_s": cfg.job.mtbf_s,
              "restart": cfg.job.restart}
    _log_analysis(run, "harness_validation", a, params)
    pred = predicted_tor(a, cfg.job.slow_mtbf_s)
    rep = replayed_tor(a, info)
    run.log(table="harness_validation", method="closed_form", metric="tor", value=pred, params=params)
    run.log(table="harness_validation", method="simulator_replay", metric="tor", value=rep, params=params)
    for t, r in r_timeline(a, 200):
        run.log(table="harness_rt", method="observed", metric="r", value=r, params={"t": round(t, 4)})
    for t, kind, dur in val["timeline"]:   # marks for the r(t) figure
        run.log(table="harness_events", method="injected" if kind != "checkpoint" else "observed",
                metric="duration_s", value=dur, params={"event": kind, "t": round(t, 4), "job": "validation"})
    out["validation"] = {"observed": a.tor, "closed_form": pred, "replay": rep, **a.to_dict()}
    for (seed, every), s in zip(grid, sweep):
        p = {"checkpoint_every": every, "fault_seed": seed, "mtbf_s": cfg.sweep_mtbf_s,
             "restart": cfg.sweep_restart, "parallel": cfg.sweep_parallel}
        if world > 1:   # W processes ran sweep_parallel jobs each at once: more load on the cores
            p["processes"] = world
        _log_analysis(run, "harness_interval_sweep", s, p)
        run.log(table="harness_interval_sweep", method="closed_form", metric="tor",
                value=predicted_tor(s, 0.0), params=p)
    out["sweep"] = [x.to_dict() for x in sweep]
    out.update(_log_sweep_optimum(run, cfg, sweep))
    return out


def paired_to_best(observed: np.ndarray, intervals: list[int], level: float = 0.95) -> dict:
    """Paired-over-seeds comparison of every grid interval with the best one (highest seed-mean TOR).

    ``observed`` is [seed, interval]. For each interval g: TOR(best) − TOR(g) per seed, its mean, standard
    error and t-interval (``common.stats.mean_ci``); g is *resolved* (worse than the best) when the whole
    interval lies above 0. The ``optimal_set`` is the best and every interval not resolved from it: the grid
    points the data cannot tell apart from the optimum. With one seed there is no interval and nothing is
    resolved (the set is the whole grid)."""
    from common.stats import mean_ci

    means = observed.mean(axis=0)
    best = intervals[int(np.argmax(means))]
    b = intervals.index(best)
    out = {}
    for i, g in enumerate(intervals):
        ci = mean_ci((observed[:, b] - observed[:, i]).tolist(), level)
        resolved = g != best and observed.shape[0] > 1 and ci["low"] > 0
        out[g] = {**ci, "resolved": bool(resolved)}
    return {"best": best, "diffs": out, "optimal_set": [g for g in intervals if not out[g]["resolved"]]}


def _log_sweep_optimum(run: RowLogger, cfg: HarnessStageConfig, sweep: list[HarnessAnalysis]) -> dict:
    """The sweep's predicted TOR curve and optimum vs the empirical ones.

    Prediction: delta, R (detection + repair + restart), start-up and step time pooled over the sweep's
    runs, the injected (uptime) MTBF, the exact fail-stop TOR (``predicted_pooled`` rows, one per grid
    interval) and its numeric argmax over whole steps. Empirical: the observed TOR per interval, paired over
    fault seeds: every interval's difference to the best (seed-mean) interval with its 95 % t-interval
    (``harness_interval_paired`` rows), and the set of intervals not resolved from the best
    (``empirical_optimal_set``): no single grid point is called the empirical optimum unless that set has
    one member. Because TOR is flat near its optimum, the comparison that matters is the ``tor_shortfall`` of
    the grid point nearest the prediction (in log-steps) against the best, with its interval, and whether that
    point lies in the optimal set."""
    from exp_tor import tor

    intervals, n_seeds = list(cfg.sweep_intervals), len(cfg.sweep_fault_seeds)
    delta = float(np.mean([s.delta for s in sweep]))
    repair = float(np.mean([s.repair for s in sweep if s.repair > 0] or [cfg.job.repair_s]))
    startup = float(np.mean([s.startup for s in sweep]))
    t_step = float(np.mean([s.t_step_opt for s in sweep]))
    T_opt = cfg.sweep_steps * t_step
    tau_opt = float(tor.numeric_interval(delta, repair, cfg.sweep_mtbf_s, step_time=t_step))
    pred_steps = max(round(tau_opt / t_step), 1)
    p = {"mtbf_s": cfg.sweep_mtbf_s, "n_fault_seeds": n_seeds, "delta": delta, "repair": repair,
         "t_step": t_step, "restart": cfg.sweep_restart}
    predicted = {}
    for every in intervals:
        predicted[every] = job_tor(T_opt, startup, tau=every * t_step, delta=delta, repair=repair,
                                   mtbf=cfg.sweep_mtbf_s)
        run.log(table="harness_interval_sweep", method="predicted_pooled", metric="tor", value=predicted[every],
                params={"checkpoint_every": every, "mtbf_s": cfg.sweep_mtbf_s, "restart": cfg.sweep_restart})
    observed = np.array([[sweep[k * len(intervals) + i].tor for i in range(len(intervals))] for k in range(n_seeds)])
    by_interval = dict(zip(intervals, observed.mean(axis=0).tolist()))
    paired = paired_to_best(observed, intervals)
    best, optimal_set = paired["best"], paired["optimal_set"]
    for g, d in paired["diffs"].items():
        pp = {"checkpoint_every": g, "best_steps": best, "mtbf_s": cfg.sweep_mtbf_s, "n_fault_seeds": n_seeds}
        se = d["se"] if n_seeds > 1 and g != best else None
        run.log(table="harness_interval_paired", method="paired_over_seeds", metric="tor_diff_to_best",
                value=d["mean"], stderr=se, n=n_seeds, params=pp)
        if se is not None:
            run.log(table="harness_interval_paired", method="paired_over_seeds", metric="ci95_low", value=d["low"],
                    n=n_seeds, params=pp)
            run.log(table="harness_interval_paired", method="paired_over_seeds", metric="ci95_high",
                    value=d["high"], n=n_seeds, params=pp)
        run.log(table="harness_interval_paired", method="paired_over_seeds", metric="resolved",
                value=int(d["resolved"]), n=n_seeds, params=pp)
    nearest = min(intervals, key=lambda e: abs(np.log(e) - np.log(pred_steps)))
    short = paired["diffs"][nearest]
    opt = "harness_interval_optimum"
    run.log(table=opt, method="predicted_numeric_exact", metric="interval_steps", value=pred_steps, params=p)
    run.log(table=opt, method="predicted_grid_best", metric="interval_steps",
            value=max(predicted, key=predicted.get), params=p)
    run.log(table=opt, method="empirical_best_mean", metric="interval_steps", value=best,
            params={**p, "resolved": len(optimal_set) == 1})
    for g in optimal_set:
        run.log(table=opt, method="empirical_optimal_set", metric="interval_steps", value=g, params=p)
    sp = {**p, "nearest_steps": nearest, "empirical_best_mean_steps": best}
    short_se = short["se"] if n_seeds > 1 and nearest != best else None   # 0 by construction when nearest is best
    run.log(table=opt, method="nearest_to_predicted", metric="tor_shortfall", value=float(short["mean"]),
            stderr=short_se, n=n_seeds, params=sp)
    if short_se is not None:
        for k in ("low", "high"):
            run.log(table=opt, method="nearest_to_predicted", metric=f"tor_shortfall_ci95_{k}", value=short[k],
                    n=n_seeds, params=sp)
    run.log(table=opt, method="nearest_to_predicted", metric="in_optimal_set", value=int(nearest in optimal_set),
            n=n_seeds, params=sp)
    for method, steps in (("young", tor.young_interval(delta, cfg.sweep_mtbf_s) / t_step),
                          ("daly", tor.daly_interval(delta, cfg.sweep_mtbf_s) / t_step)):
        run.log(table=opt, method=method, metric="interval_steps", value=float(steps), params=p)
    return {"optimum": {"predicted_steps": pred_steps, "empirical_best_mean_steps": best,
                        "empirical_optimal_set": optimal_set, "nearest_grid": nearest,
                        "nearest_in_optimal_set": nearest in optimal_set,
                        "tor_shortfall": float(short["mean"]), "tor_shortfall_se": short_se,
                        "tor_shortfall_ci95": [short["low"], short["high"]] if short_se is not None else None,
                        "paired_to_best": {g: {k: d[k] for k in ("mean", "se", "low", "high", "resolved")}
                                           for g, d in paired["diffs"].items()},
                        "tor_by_interval": by_interval, "predicted_by_interval": predicted}}

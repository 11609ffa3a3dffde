"""Training Overhead Ratio experiments (Lu et al., arXiv 2408.07482).

    python exp_tor/run.py --profile quick                  # CPU, all stages (closed, simulate, planning, harness)
    python exp_tor/run.py --profile quick --stage closed   # a subset: closed,simulate,planning,harness
    python exp_tor/run.py --profile paper                  # larger Monte Carlo sweeps, longer harness jobs
    python exp_tor/run.py --stage simulate sim.trace=trace.csv   # also replay a failure trace (CSV)

Stages (common.stages): each writes its rows and a summary JSON into outputs/exp_tor/<stage>/<hash>/ and
is skipped when that folder is complete for the config keys it depends on: closed (closed.*), simulate
(seed, sim.*), planning (planning.*), harness (harness.*; the jobs' run directories are kept in the
stage's folder, under jobs/). Every row goes to the shared results table (tables tor_*, harness_*).

Under `accelerate launch --multi_gpu --num_processes W` the simulate stage's Monte Carlo runs and the
harness's jobs are shared out over the W processes and gathered to the main process, which alone logs the
rows (exp_tor/distributed.py); closed and planning run on the main process only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from common.data import DataValidationError
from common.stages import Pipeline, Stage, StageContext, run_experiment
from exp_tor import planning, tor
from exp_tor import simulate as sim
from exp_tor.config import Config, SimConfig
from exp_tor.distributed import run_shared

EXP = "exp_tor"


def stage_closed(ctx: StageContext) -> None:
    if not ctx.is_main:   # milliseconds of closed forms: the main process computes and logs them alone
        return
    c = ctx.cfg.closed
    m, kinds = np.asarray(c.mtbfs, dtype=float), list(c.mtbf_kinds)
    # the interval formulas take the uptime MTBF (Daly's model: failures also hit repair); a wall-clock MTBF
    # (Llama 3's 185.6 min) is converted first, and the exact TOR is evaluated under the same reading
    m_up = np.array([float(tor.uptime_mtbf(mi, c.repair, k, repair_interruptible=True)) for mi, k in zip(m, kinds)])
    rows = {"young": tor.young_interval(c.delta, m_up), "daly": tor.daly_interval(c.delta, m_up),
            "tor_first_order": tor.tor_first_order_interval(c.delta, m_up),
            "availability": tor.availability_interval(c.delta, m_up, c.repair),
            "numeric_exact_daly_model": np.array([float(tor.numeric_interval(c.delta, c.repair, mi, k, True))
                                                  for mi, k in zip(m, kinds)])}

    def exact(tau, mi, k):
        return float(tor.fail_stop_exact(tau, c.delta, c.repair, mi, k, repair_interruptible=True))

    for method, taus in rows.items():
        for mi, k, mu, ti in zip(m, kinds, m_up, taus):
            p = {"mtbf": float(mi), "mtbf_kind": k, "mtbf_uptime": float(mu), "delta": c.delta, "repair": c.repair}
            ctx.log(table="tor_optimal_interval", method=method, metric="tau_opt", value=float(ti), params=p)
            ctx.log(table="tor_optimal_interval", method=method, metric="tor_exact", params=p,
                    value=exact(ti, mi, k))
    for mi, k, mu, ti in zip(m, kinds, m_up, rows["numeric_exact_daly_model"]):
        p = {"mtbf": float(mi), "mtbf_kind": k, "mtbf_uptime": float(mu), "delta": c.delta, "repair": c.repair}
        best = exact(ti, mi, k)
        for key, f in (("loss_low", 0.7), ("loss_high", 1.3)):
            ctx.log(table="tor_optimal_interval", method="numeric_exact_daly_model", metric=f"tor_{key}_30pct",
                    value=best - exact(ti * f, mi, k), params=p)
    for mi, k, mu in zip(m, kinds, m_up):
        taus = np.geomspace(0.05, 5, c.curve_points) * float(tor.young_interval(c.delta, mu))
        for form, vals in (("exact", tor.fail_stop_exact(taus, c.delta, c.repair, mi, k)),
                           ("first_order", tor.fail_stop_first_order(taus, c.delta, c.repair, mi, k))):
            for t, v in zip(taus, vals):
                ctx.log(table="tor_vs_interval", method=form, metric="tor", value=float(v),
                        params={"mtbf": float(mi), "mtbf_kind": k, "tau": float(t), "delta": c.delta,
                                "repair": c.repair})
        t_star = tor.daly_interval(c.delta, mu)
        for stage, share in tor.fail_stop_breakdown(t_star, c.delta, c.repair, mi, k).items():
            ctx.log(table="tor_breakdown", method="exact", metric="share", value=float(share),
                    params={"mtbf": float(mi), "mtbf_kind": k, "stage": stage, "tau": float(t_star)})
    # the optimal intervals per method, for a user or a later stage to read without the results table
    ctx.save_json("closed.json", {"delta": c.delta, "repair": c.repair, "mtbfs": c.mtbfs, "mtbf_kinds": kinds,
                                  "tau_opt": {k: np.atleast_1d(v).tolist() for k, v in rows.items()}})


def load_trace(path: str) -> list[sim.FaultEvent]:
    """The trace's events; a bad file is the user's input error (exit 2, file:line in the message)."""
    try:
        return sim.load_trace(path)
    except ValueError as exc:
        raise DataValidationError(f"key 'sim.trace': {exc}") from None


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def simulate_jobs(s: SimConfig, seed: int) -> list[dict]:
    """The simulate stage's Monte Carlo runs, each with its own seed (seed + 1, + 2, ... in this order)."""
    jobs = []
    variants = [("blocking", {}), ("async", {"commit": s.commit}), ("daly_repair", {"repair_interruptible": True})]
    for tau in s.taus:
        for m in s.mtbfs:
            for name, kw in variants:
                seed += 1
                jobs.append({"kind": "validation", "tau": tau, "mtbf": m, "variant": name, "kw": kw, "seed": seed})
            for dist, shape in (("weibull", s.weibull_shape), ("lognormal", s.lognormal_sigma)):
                seed += 1
                jobs.append({"kind": "robustness", "tau": tau, "mtbf": m, "dist": dist, "shape": shape, "seed": seed})
    for policy in ("tolerate", "ckpt_restart"):
        seed += 1
        jobs.append({"kind": "fail_slow", "policy": policy, "seed": seed})
    return jobs


def _simulate_one(s: SimConfig, job: dict) -> sim.SimResult:
    if job["kind"] == "validation":
        return sim.simulate_fail_stop(job["tau"], s.delta, s.repair, job["mtbf"], s.n_cycles, seed=job["seed"],
                                      **job["kw"])
    if job["kind"] == "robustness":
        return sim.simulate_fail_stop(job["tau"], s.delta, s.repair, job["mtbf"], s.n_cycles, seed=job["seed"],
                                      dist=job["dist"], shape=job["shape"])
    return sim.simulate_fail_slow(600.0, 0.6, 20.0, 12.0, job["policy"], s.n_cycles, seed=job["seed"])


def stage_simulate(ctx: StageContext) -> None:
    s = ctx.cfg.sim
    events = load_trace(s.trace) if s.trace else None   # read first: a bad trace fails before the sweeps
    jobs = simulate_jobs(s, ctx.cfg.seed)
    # independent seeded runs: shared out over the processes of a multi-process launch, gathered in order
    results = run_shared(ctx, jobs, lambda j: _simulate_one(s, j), label="exp_tor simulate", progress=False)
    if not ctx.is_main:   # the main process logs the rows and writes the summary
        return
    validation = []
    for job, r in zip(jobs, results):
        if job["kind"] == "validation":
            tau, m, name, kw = job["tau"], job["mtbf"], job["variant"], job["kw"]
            exact = float(tor.fail_stop_exact(tau, s.delta, s.repair, m, **kw))
            z = (r.tor - exact) / r.se
            p = {"tau": tau, "mtbf": m, "variant": name}
            ctx.log(table="tor_validation", method="simulator", metric="tor", value=r.tor, stderr=r.se,
                    n=r.n_cycles, params=p)
            ctx.log(table="tor_validation", method="closed_exact", metric="tor", value=exact, params=p)
            ctx.log(table="tor_validation", method="simulator", metric="z_score", value=z, params=p)
            validation.append({**p, "simulator": r.tor, "se": r.se, "closed_exact": exact, "z": z})
        elif job["kind"] == "robustness":
            ctx.log(table="tor_robustness", method=f"simulator_{job['dist']}", metric="tor", value=r.tor,
                    stderr=r.se, n=r.n_cycles, params={"tau": job["tau"], "mtbf": job["mtbf"], "shape": job["shape"]})
        else:
            policy = job["policy"]
            p = {"policy": policy, "slow_mtbf": 600.0, "rho": 0.6, "D": 20.0, "P": 12.0}
            ctx.log(table="tor_fail_slow", method="simulator", metric="tor", value=r.tor, stderr=r.se, params=p)
            ctx.log(table="tor_fail_slow", method="closed", metric="tor", params=p,
                    value=float(tor.fail_slow(600.0, 0.6, 20.0, 12.0, policy)))
    summary = {"n_cycles": s.n_cycles, "validation": validation,
               "max_abs_z": max((abs(v["z"]) for v in validation), default=None), "trace": None}
    if events is not None:
        summary["trace"] = {"file": Path(s.trace).name, "sha256": file_sha256(s.trace),
                            **replay_trace(ctx, events)}
    ctx.save_json("simulate.json", summary)


def replay_trace(ctx: StageContext, events: list[sim.FaultEvent]) -> dict:
    """Replay a failure trace through the per-event simulator next to the closed form at its rate."""
    s = ctx.cfg.sim
    job = sim.simulate_job(s.trace_t_opt, s.trace_tau, s.trace_delta, s.trace_repair, events=events,
                           policy=s.trace_policy)
    p = {"trace": Path(s.trace).name, "tau": s.trace_tau, "delta": s.trace_delta, "repair": s.trace_repair}
    ctx.log(table="tor_trace_replay", method="simulator_replay", metric="tor", value=job.tor, params=p,
            extra={"stages": job.stages, "n_fail_stop": job.n_fail_stop, "n_fail_slow": job.n_fail_slow})
    for stage, sec in job.stages.items():
        ctx.log(table="tor_trace_replay", method="simulator_replay", metric="stage_share", value=sec / job.t_obs,
                params={**p, "stage": stage})
    return {"tor": job.tor, "stages": job.stages, "n_fail_stop": job.n_fail_stop, "n_fail_slow": job.n_fail_slow}


def _finite(x) -> float | None:
    """A number for a params field, None where there is none (no interval: MTBF below the repair time)."""
    return float(x) if np.isfinite(x) else None


def stage_planning(ctx: StageContext) -> None:
    if not ctx.is_main:   # a few closed forms: the main process alone
        return
    pc = ctx.cfg.planning
    table = planning.cost_table(pc)
    for row in table:
        p = {"model": row["model"], "gpus": row["gpus"]}
        for k in ("tokens_b", "days", "cost_usd", "tor", "mtbf_h", "days_with_failures", "cost_with_failures"):
            ctx.log(table="tor_cost_table", method="planning", metric=k, value=row[k], params=p)
    t, tau, m = planning.tor_at_scale(np.asarray(pc.cluster_sizes), pc)
    cluster = []
    for g, ti, taui, mi in zip(pc.cluster_sizes, t, tau, m):
        p = {"gpus": int(g), "mtbf_h": float(mi) / 3600, "tau_s": _finite(taui)}
        ctx.log(table="tor_vs_cluster", method="exact_daly_interval", metric="tor", value=float(ti), params=p)
        cluster.append({**p, "tor": float(ti)})
    # TOR next to Meta's ETTR on the same inputs, under each failure-rate scenario
    scenarios = planning.rate_scenarios(pc)
    ettr_rows = []
    for name, rate in scenarios.items():
        e = planning.ettr_at_scale(np.asarray(pc.cluster_sizes), pc, rate)
        for i, g in enumerate(pc.cluster_sizes):
            p = {"gpus": int(g), "rate_scenario": name, "failures_per_1000_node_days": rate,
                 "rate_vs_rsc1": rate / pc.failures_per_1000_node_days, "mtbf_h": float(e["mtbf_s"][i]) / 3600,
                 "tau_s": _finite(e["tau_s"][i]), "delta_s": pc.delta_s, "u0_s": pc.repair_s}
            for method in ("tor_exact", "tor_first_order", "ettr"):
                ctx.log(table="tor_vs_ettr", method=method, metric="ratio", value=float(e[method][i]), params=p)
            ettr_rows.append({**p, **{k: float(e[k][i]) for k in ("tor_exact", "tor_first_order", "ettr")}})
    ctx.save_json("planning.json", {"cost_table": table, "tor_vs_cluster": cluster, "tor_vs_ettr": ettr_rows,
                                    "rate_scenarios": scenarios})


def stage_harness(ctx: StageContext) -> None:
    from exp_tor.harness.experiment import run_harness_stage

    out = run_harness_stage(ctx.cfg.harness, ctx, ctx.out_dir / "jobs")
    if not ctx.is_main:   # the jobs were shared out; the main process has every result
        return
    ctx.save_json("harness.json", out)
    v, o = out["validation"], out["optimum"]
    print(f"[exp_tor] harness: observed TOR {v['observed']:.3f}, closed form {v['closed_form']:.3f}, "
          f"replay {v['replay']:.3f}; interval optimum predicted {o['predicted_steps']} steps, "
          f"observed best (seed mean) {o['empirical_best_mean_steps']} steps, not resolved from it "
          f"(paired 95 % CI): {o['empirical_optimal_set']}")


STAGES = [
    Stage("closed", stage_closed, config_keys=("closed",),
          description="closed forms: optimal intervals, TOR vs interval, overhead breakdown"),
    Stage("simulate", stage_simulate, config_keys=("seed", "sim"),
          description="Monte Carlo simulator vs the exact closed form; optional trace replay (sim.trace)"),
    Stage("planning", stage_planning, config_keys=("planning",),
          description="training cost table and TOR vs cluster size"),
    # version 2: fail-slow windows drawn on the training clock (version 1 drew them on the job clock)
    Stage("harness", stage_harness, config_keys=("harness",), version="2",
          description="TOR of real fault-injected training runs (validation job, interval sweep)"),
]


def check_trace(cfg: Config, force: bool) -> None:
    """Before any stage: a bad trace exits 2 even when simulate would be skipped, and an edited trace is not
    silently ignored (the simulate folder's hash covers the trace's path, not its content)."""
    if "simulate" not in cfg.stages or not cfg.sim.trace:
        return
    load_trace(cfg.sim.trace)
    done = Pipeline(EXP, STAGES).stage_dir("simulate", cfg)
    if force or not Pipeline.is_complete(done):
        return
    try:
        recorded = (json.loads((done / "simulate.json").read_text(encoding="utf-8")).get("trace") or {}).get("sha256")
    except (OSError, json.JSONDecodeError):
        recorded = None
    if recorded != file_sha256(cfg.sim.trace):
        raise DataValidationError(f"key 'sim.trace': {cfg.sim.trace} changed since the simulate stage replayed it "
                                  f"(output {done.name}); rerun with --force, or save the new trace under a new name")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in argv
    return run_experiment(EXP, Config, STAGES, argv=argv, doc=__doc__, setup=lambda cfg: check_trace(cfg, force))


if __name__ == "__main__":
    raise SystemExit(main())

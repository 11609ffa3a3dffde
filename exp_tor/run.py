"""Training Overhead Ratio experiments (Lu et al., arXiv 2408.07482).

    python exp_tor/run.py --profile quick                  # CPU, all stages (closed, simulate, planning, harness)
    python exp_tor/run.py --profile quick --stage closed   # a subset: closed,simulate,planning,harness
    python exp_tor/run.py --profile paper                  # larger Monte Carlo sweeps, longer harness jobs

Every table row goes to the shared results table via common.results.Run (tables tor_*).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from common.config import make_parser, parse_config
from common.results import Run
from exp_tor import planning, tor
from exp_tor import simulate as sim
from exp_tor.config import STAGES, Config

EXP = "exp_tor"


def stage_closed(cfg: Config, run: Run) -> None:
    c = cfg.closed
    m = np.asarray(c.mtbfs)
    rows = {"young": tor.young_interval(c.delta, m), "daly": tor.daly_interval(c.delta, m),
            "tor_first_order": tor.tor_first_order_interval(c.delta, m),
            "availability": tor.availability_interval(c.delta, m, c.repair),
            "numeric_exact_daly_model": tor.numeric_interval(c.delta, c.repair, m, repair_interruptible=True)}
    for method, taus in rows.items():
        for mi, ti in zip(m, taus):
            p = {"mtbf": float(mi), "delta": c.delta, "repair": c.repair}
            run.log(table="tor_optimal_interval", method=method, metric="tau_opt", value=float(ti), params=p)
            run.log(table="tor_optimal_interval", method=method, metric="tor_exact", params=p,
                    value=float(tor.fail_stop_exact(ti, c.delta, c.repair, mi, repair_interruptible=True)))
    flat = tor.interval_flatness(rows["numeric_exact_daly_model"], c.delta, c.repair, m, band=0.3,
                                 repair_interruptible=True)
    for key in ("loss_low", "loss_high"):
        for mi, v in zip(m, flat[key]):
            run.log(table="tor_optimal_interval", method="numeric_exact_daly_model", metric=f"tor_{key}_30pct",
                    value=float(v), params={"mtbf": float(mi), "delta": c.delta, "repair": c.repair})
    for mi in m:
        taus = np.geomspace(0.05, 5, c.curve_points) * float(tor.young_interval(c.delta, mi))
        for form, vals in (("exact", tor.fail_stop_exact(taus, c.delta, c.repair, mi)),
                           ("first_order", tor.fail_stop_first_order(taus, c.delta, c.repair, mi))):
            for t, v in zip(taus, vals):
                run.log(table="tor_vs_interval", method=form, metric="tor", value=float(v),
                        params={"mtbf": float(mi), "tau": float(t), "delta": c.delta, "repair": c.repair})
        t_star = tor.daly_interval(c.delta, mi)
        for stage, share in tor.fail_stop_breakdown(t_star, c.delta, c.repair, mi).items():
            run.log(table="tor_breakdown", method="exact", metric="share", value=float(share),
                    params={"mtbf": float(mi), "stage": stage, "tau": float(t_star)})


def stage_simulate(cfg: Config, run: Run) -> None:
    s = cfg.sim
    seed = cfg.seed
    variants = [("blocking", {}), ("async", {"commit": s.commit}), ("daly_repair", {"repair_interruptible": True})]
    for tau in s.taus:
        for m in s.mtbfs:
            for name, kw in variants:
                seed += 1
                r = sim.simulate_fail_stop(tau, s.delta, s.repair, m, s.n_cycles, seed=seed, **kw)
                exact = float(tor.fail_stop_exact(tau, s.delta, s.repair, m, **kw))
                z = (r.tor - exact) / r.se
                p = {"tau": tau, "mtbf": m, "variant": name}
                run.log(table="tor_validation", method="simulator", metric="tor", value=r.tor, stderr=r.se,
                        n=r.n_cycles, params=p)
                run.log(table="tor_validation", method="closed_exact", metric="tor", value=exact, params=p)
                run.log(table="tor_validation", method="simulator", metric="z_score", value=z, params=p)
            for dist, shape in (("weibull", s.weibull_shape), ("lognormal", s.lognormal_sigma)):
                seed += 1
                r = sim.simulate_fail_stop(tau, s.delta, s.repair, m, s.n_cycles, seed=seed, dist=dist, shape=shape)
                run.log(table="tor_robustness", method=f"simulator_{dist}", metric="tor", value=r.tor, stderr=r.se,
                        n=r.n_cycles, params={"tau": tau, "mtbf": m, "shape": shape})
    for policy in ("tolerate", "ckpt_restart"):
        seed += 1
        r = sim.simulate_fail_slow(600.0, 0.6, 20.0, 12.0, policy, s.n_cycles, seed=seed)
        p = {"policy": policy, "slow_mtbf": 600.0, "rho": 0.6, "D": 20.0, "P": 12.0}
        run.log(table="tor_fail_slow", method="simulator", metric="tor", value=r.tor, stderr=r.se, params=p)
        run.log(table="tor_fail_slow", method="closed", metric="tor", params=p,
                value=float(tor.fail_slow(600.0, 0.6, 20.0, 12.0, policy)))


def stage_trace(cfg: Config, run: Run) -> None:
    """Replay a failure trace (CSV) through the per-event simulator next to the closed form at its rate."""
    s = cfg.sim
    events = sim.load_trace(s.trace)
    job = sim.simulate_job(s.trace_t_opt, s.trace_tau, s.trace_delta, s.trace_repair, events=events,
                           policy=s.trace_policy)
    p = {"trace": Path(s.trace).name, "tau": s.trace_tau, "delta": s.trace_delta, "repair": s.trace_repair}
    run.log(table="tor_trace_replay", method="simulator_replay", metric="tor", value=job.tor, params=p,
            extra={"stages": job.stages, "n_fail_stop": job.n_fail_stop, "n_fail_slow": job.n_fail_slow})
    for stage, sec in job.stages.items():
        run.log(table="tor_trace_replay", method="simulator_replay", metric="stage_share", value=sec / job.t_obs,
                params={**p, "stage": stage})


def stage_planning(cfg: Config, run: Run) -> None:
    pc = cfg.planning
    for row in planning.cost_table(pc):
        p = {"model": row["model"], "gpus": row["gpus"]}
        for k in ("tokens_b", "days", "cost_usd", "tor", "mtbf_h", "days_with_failures", "cost_with_failures"):
            run.log(table="tor_cost_table", method="planning", metric=k, value=row[k], params=p)
    t, tau, m = planning.tor_at_scale(np.asarray(pc.cluster_sizes), pc)
    for g, ti, taui, mi in zip(pc.cluster_sizes, t, tau, m):
        p = {"gpus": int(g), "mtbf_h": float(mi) / 3600, "tau_s": float(taui)}
        run.log(table="tor_vs_cluster", method="exact_daly_interval", metric="tor", value=float(ti), params=p)


def stage_harness(cfg: Config, run: Run) -> None:
    from exp_tor.harness.experiment import run_harness_stage

    out = run_harness_stage(cfg.harness, run)
    v, o = out["validation"], out["optimum"]
    print(f"[exp_tor] harness: observed TOR {v['observed']:.3f}, closed form {v['closed_form']:.3f}, "
          f"replay {v['replay']:.3f}; interval optimum predicted {o['predicted_steps']} steps, "
          f"empirical peak {o['empirical_peak_steps']} steps")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--stage", default=None, help=f"comma-separated subset of {', '.join(STAGES)} or all")
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_config(Config, config_dir=Path(__file__).parent / "configs", argv=argv, parser=parser)
    if args.stage is not None:
        cfg.stage = args.stage
        try:
            cfg.validate()
        except ValueError as exc:
            print(f"config error: --stage: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    stages = STAGES if cfg.stage == "all" else tuple(cfg.stage.split(","))
    run = Run(EXP, config=cfg, seed=cfg.seed, profile=args.profile_name)
    fns = {"closed": stage_closed, "simulate": stage_simulate, "planning": stage_planning, "harness": stage_harness}
    for st in stages:
        t0 = time.perf_counter()
        fns[st](cfg, run)
        if st == "simulate" and cfg.sim.trace:
            try:
                stage_trace(cfg, run)
            except ValueError as exc:          # bad trace file: message names file and line
                print(f"trace error: {exc}", file=sys.stderr)
                return 2
        print(f"[exp_tor] stage {st}: {time.perf_counter() - t0:.1f} s")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cluster-scale planning: the slide deck's "LLM training costs" table plus TOR under published failure rates.

Compute: tokens D ≈ 20·N, FLOPs ≈ 6·N·D, days = FLOPs / (GPUs · peak · MFU). Failures: per-node Poisson rate
from Meta RSC-1 (6.50 failures per 1000 node-days, Kokolis et al., arXiv 2410.21680), so the job's
wall-clock MTBF is 24 h / (nodes · rate); TOR is the exact fail-stop form at the Daly interval (ours).
Next to it, on the same inputs: Meta's own ETTR approximation (``tor.ettr_meta``), and the sensitivity of
both to the failure rate (Meta's measured 7.9 h MTTF at 1,024 GPUs is a per-node rate ≈ 3.7× the 6.50).
"""

from __future__ import annotations

import numpy as np

from exp_tor import tor
from exp_tor.config import PlanningConfig


def job_mtbf_s(gpus, cfg: PlanningConfig, failures_per_1000_node_days: float | None = None):
    """Wall-clock MTBF (s) of a job on ``gpus`` GPUs: 24 h / (nodes · per-node rate)."""
    rate = cfg.failures_per_1000_node_days if failures_per_1000_node_days is None else failures_per_1000_node_days
    nodes = np.maximum(np.asarray(gpus, float) / cfg.gpus_per_node, 1.0)
    return 86400.0 / (nodes * rate / 1000.0)


def rate_from_mttf(mttf_h: float, gpus: int, gpus_per_node: int) -> float:
    """Per-node failure rate (failures per 1000 node-days) implied by a job MTTF measured at ``gpus`` GPUs."""
    return 1000.0 * 24.0 / (mttf_h * max(gpus / gpus_per_node, 1.0))


def tor_at_scale(gpus, cfg: PlanningConfig, failures_per_1000_node_days: float | None = None):
    """Exact TOR at the Daly interval for a job on ``gpus`` GPUs (wall-clock MTBF reading). A job whose
    wall-clock MTBF is not above the repair time never gets back to training: TOR 0, no interval (nan)."""
    m_wall = np.asarray(job_mtbf_s(gpus, cfg, failures_per_1000_node_days), dtype=float)
    ok = m_wall > cfg.repair_s
    m_ok = np.where(ok, m_wall, 2 * cfg.repair_s + 1.0)     # placeholder where infeasible, masked below
    m_up = tor.uptime_mtbf(m_ok, cfg.repair_s, "wallclock")
    tau = tor.daly_interval(cfg.delta_s, m_up)
    t = tor.fail_stop_exact(tau, cfg.delta_s, cfg.repair_s, m_ok, "wallclock")
    return np.where(ok, t, 0.0), np.where(ok, tau, np.nan), m_wall


def cost_table(cfg: PlanningConfig) -> list[dict]:
    rows = []
    for name, n_b, gpus in zip(cfg.models, cfg.params_b, cfg.gpus):
        n = n_b * 1e9
        d = cfg.tokens_per_param * n
        days = 6 * n * d / (gpus * cfg.peak_flops * cfg.mfu) / 86400
        cost = days * 24 * gpus * cfg.usd_per_gpu_hour
        t, tau, m = tor_at_scale(gpus, cfg)
        rows.append({"model": name, "params_b": n_b, "tokens_b": d / 1e9, "gpus": gpus, "days": days,
                     "cost_usd": cost, "tor": float(t), "tau_s": float(tau), "mtbf_h": float(m) / 3600,
                     "days_with_failures": days / float(t), "cost_with_failures": cost / float(t)})
    return rows


def ettr_at_scale(gpus, cfg: PlanningConfig, failures_per_1000_node_days: float | None = None) -> dict:
    """TOR and Meta's ETTR on the same inputs: the job's failure rate 1/M_wall, the Daly interval τ, checkpoint
    write time δ, restart overhead u0 = R. Returns arrays keyed tor_exact, tor_first_order, ettr, tau_s,
    mtbf_s."""
    t, tau, m_wall = tor_at_scale(gpus, cfg, failures_per_1000_node_days)
    ok = np.isfinite(tau)
    m_ok, tau_ok = np.where(ok, m_wall, 2 * cfg.repair_s + 1.0), np.where(ok, tau, 1.0)
    first = np.where(ok, tor.fail_stop_first_order(tau_ok, cfg.delta_s, cfg.repair_s, m_ok, "wallclock"), 0.0)
    ettr = np.where(ok, tor.ettr_meta(tau_ok, cfg.delta_s, cfg.repair_s, 1.0 / m_ok), 0.0)
    return {"tor_exact": t, "tor_first_order": first, "ettr": ettr, "tau_s": tau, "mtbf_s": m_wall}


def rate_scenarios(cfg: PlanningConfig) -> dict[str, float]:
    """Failure-rate scenarios (per 1000 node-days): the planner's rate × each multiplier, and the rate
    implied by the measured MTTF (``measured_mttf_h`` at ``measured_mttf_gpus``)."""
    out = {f"rsc1_x{m:g}": cfg.failures_per_1000_node_days * m for m in cfg.rate_multipliers}
    out[f"measured_mttf_{cfg.measured_mttf_h:g}h_at_{cfg.measured_mttf_gpus}gpus"] = rate_from_mttf(
        cfg.measured_mttf_h, cfg.measured_mttf_gpus, cfg.gpus_per_node)
    return out

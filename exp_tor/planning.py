"""Cluster-scale planning: the slide deck's "LLM training costs" table plus TOR under published failure rates.

Compute: tokens D ≈ 20·N, FLOPs ≈ 6·N·D, days = FLOPs / (GPUs · peak · MFU). Failures: per-node Poisson rate
from Meta RSC-1 (6.50 failures per 1000 node-days, Kokolis et al., arXiv 2410.21680), so the job's
wall-clock MTBF is 24 h / (nodes · rate); TOR is the exact fail-stop form at the Daly interval (ours).
"""

from __future__ import annotations

import numpy as np

from exp_tor import tor
from exp_tor.config import PlanningConfig


def job_mtbf_s(gpus, cfg: PlanningConfig):
    nodes = np.maximum(np.asarray(gpus, float) / cfg.gpus_per_node, 1.0)
    return 86400.0 / (nodes * cfg.failures_per_1000_node_days / 1000.0)


def tor_at_scale(gpus, cfg: PlanningConfig):
    """Exact TOR at the Daly interval for a job on ``gpus`` GPUs (wall-clock MTBF reading)."""
    m_wall = job_mtbf_s(gpus, cfg)
    m_up = tor.uptime_mtbf(m_wall, cfg.repair_s, "wallclock")
    tau = tor.daly_interval(cfg.delta_s, m_up)
    return tor.fail_stop_exact(tau, cfg.delta_s, cfg.repair_s, m_wall, "wallclock"), tau, m_wall


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

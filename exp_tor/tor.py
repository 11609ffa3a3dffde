"""Closed-form Training Overhead Ratio (TOR) of Lu et al., arXiv 2408.07482.

TOR = T_opt / T_obs with W_opt·T_opt = ∫ w_obs dt and r(t) = w_obs(t)/W_opt   [paper, eqs. (1)-(4)]

Everything else in this file is a RECONSTRUCTION (ours, after §1.5 of the project's TOR research note, kept
with the shared research notes outside this repository), not the paper's printed equations, which we could
not read: a repeating unit of stages (healthy run, checkpoint saving, repair, slow recovery; fail-slow
stages) evaluated with renewal-reward theory:

    TOR = (Σ_k r_k·E[d_k] − E[L]) / Σ_k E[d_k]                          (general stage form)

Symbols (any time unit, used consistently): tau = healthy compute between checkpoints, delta = blocking
checkpoint time, commit = time from checkpoint start until it is durable (async: commit >= delta),
repair = R, mtbf = M (``mtbf_kind`` 'uptime': mean uptime between failures, unit = M + R;
'wallclock': mean wall-clock gap between failure onsets, repair included — e.g. Llama 3's 3.09 h).
Fail-slow: slow_mtbf = M_s, rho = preservation ratio while slow, slow_duration = D (until it ends or is
detected), mitigation = P (time at r = 0 to mitigate). mtbf = inf (or <= 0) means "no failures".
All functions broadcast over numpy arrays.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq, minimize_scalar

MTBF_KINDS = ("uptime", "wallclock")
SLOW_POLICIES = ("tolerate", "ckpt_restart", "treat_as_stop")


def _arr(*xs):
    return np.broadcast_arrays(*[np.asarray(x, dtype=float) for x in xs])


def _none_if_inf(m):
    """Treat mtbf <= 0 or inf as 'no failures'."""
    m = np.asarray(m, dtype=float)
    return np.where((m <= 0) | ~np.isfinite(m), np.inf, m)


def _check_kind(mtbf_kind: str) -> None:
    if mtbf_kind not in MTBF_KINDS:
        raise ValueError(f"mtbf_kind must be one of {MTBF_KINDS}, got '{mtbf_kind}'")


# ----------------------------------------------------------------------------------------- general form
def stage_tor(durations, ratios, lost=0.0):
    """General stage form: TOR = (Σ r_k E[d_k] − E[L]) / Σ E[d_k]; stages along the last axis."""
    d = np.asarray(durations, dtype=float)
    r = np.asarray(ratios, dtype=float)
    total = d.sum(axis=-1)
    return np.clip(((r * d).sum(axis=-1) - np.asarray(lost, dtype=float)) / total, 0.0, 1.0)


def uptime_mtbf(mtbf, repair, mtbf_kind: str = "uptime", repair_interruptible: bool = False):
    """Mean uptime between failures M_up from an MTBF of either reading.

    wallclock: M_wall = M_up + E[repair incl. restarts]; non-interruptible repair gives M_up = M_wall − R;
    Daly's interruptible repair gives M_wall = M_up·e^{R/M_up}, solved numerically (ours)."""
    _check_kind(mtbf_kind)
    m, r = _arr(_none_if_inf(mtbf), repair)
    if mtbf_kind == "uptime":
        return m
    if np.any(np.isfinite(m) & (m <= r)):
        raise ValueError("wall-clock MTBF must exceed the repair time")
    if not repair_interruptible:
        return m - r

    def solve(mw: float, rr: float) -> float:
        if not np.isfinite(mw) or rr == 0:
            return mw
        # M·e^{R/M} is decreasing in M on (0, R] and increasing above R, minimum e·R there
        if mw < np.e * rr:
            raise ValueError(f"wall-clock MTBF {mw} < e·R: no uptime MTBF with interruptible repair")
        return brentq(lambda x: x * np.exp(rr / x) - mw, rr, mw)

    return np.vectorize(solve, otypes=[float])(m, r)


# ------------------------------------------------------------------------------------------ fail-stop
def fail_stop_first_order(tau, delta, repair, mtbf, mtbf_kind: str = "uptime", commit=None,
                          warmup=0.0, r_warmup=1.0):
    """First-order fail-stop TOR (reconstruction): (M_up·τ/(τ+δ) − E[L] + r_w·W) / (M_up + R + W),
    E[L] ≈ τ/2 + (commit − δ) (async commit enlarges the rollback window; ours). W = Slow Recovery stage
    after each repair at rate r_w, off the failure clock (ours; the research note writes (r_w−1)·W in the
    numerator, i.e. a warm-up that also displaces healthy time — with r_w = 0 both equal R → R + W)."""
    _check_kind(mtbf_kind)
    commit = delta if commit is None else commit
    tau, delta, repair, commit, warmup, r_warmup = _arr(tau, delta, repair, commit, warmup, r_warmup)
    m_up = uptime_mtbf(mtbf, repair, mtbf_kind)
    ckpt = tau / (tau + delta)
    with np.errstate(invalid="ignore", divide="ignore"):
        lost = tau / 2 + (commit - delta)
        val = (m_up * ckpt - lost + r_warmup * warmup) / (m_up + repair + warmup)
    return np.clip(np.where(np.isinf(m_up), ckpt, val), 0.0, 1.0)


def fail_stop_exact(tau, delta, repair, mtbf, mtbf_kind: str = "uptime", repair_interruptible: bool = False,
                    commit=None):
    """Exact fail-stop TOR under Poisson failures on uptime (renewal-reward over one failure cycle).

    Checkpoint j (started after τ of healthy work in period j, period P = τ+δ) is durable at (j−1)P + τ + c
    (c = commit >= δ). E[#durable] = e^{−(τ+c)/M}/(1 − e^{−P/M}); E[cycle] = M + R, or M·e^{R/M} when
    failures also hit repair (Daly). For c = δ this is τ/[(e^{P/M}−1)(M+R)]."""
    commit = delta if commit is None else commit
    tau, delta, repair, commit = _arr(tau, delta, repair, commit)
    if np.any(commit < delta):
        raise ValueError("commit time must be >= blocking checkpoint time delta")
    m = uptime_mtbf(mtbf, repair, mtbf_kind, repair_interruptible)
    finite = np.isfinite(m)
    ms = np.where(finite, m, 1.0)
    p = tau + delta
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        n_durable = np.exp(-(tau + commit) / ms) / -np.expm1(-p / ms)
        cycle = ms * np.exp(repair / ms) if repair_interruptible else ms + repair
        val = tau * n_durable / cycle
    return np.clip(np.where(finite, np.nan_to_num(val), tau / p), 0.0, 1.0)


def fail_stop_breakdown(tau, delta, repair, mtbf, mtbf_kind: str = "uptime") -> dict:
    """Exact expected share of wall clock per stage (blocking checkpoints, non-interruptible repair):
    useful (= TOR), checkpoint, lost (rolled-back healthy time), repair. Shares sum to 1."""
    tau, delta, repair = _arr(tau, delta, repair)
    m = uptime_mtbf(mtbf, repair, mtbf_kind)
    finite = np.isfinite(m)
    ms = np.where(finite, m, 1.0)
    p = tau + delta
    q = np.exp(-p / ms)
    k = q / (1 - q)                                   # E[# completed periods before the failure]
    lost = (ms * -np.expm1(-tau / ms) - tau * q) / (1 - q)   # E[min(X mod P, τ)]
    rem = ms - p * k                                   # E[X mod P]
    cycle = ms + repair
    out = {"useful": tau * k / cycle, "checkpoint": (delta * k + rem - lost) / cycle,
           "lost": lost / cycle, "repair": repair / cycle}
    ideal = {"useful": tau / p, "checkpoint": delta / p, "lost": 0 * p, "repair": 0 * p}
    return {s: np.where(finite, out[s], ideal[s]) for s in out}


# ------------------------------------------------------------------------------------------ fail-slow
def fail_slow(slow_mtbf, rho, slow_duration, mitigation=0.0, policy: str = "tolerate", tau=None, delta=0.0,
              repair=0.0):
    """Fail-slow TOR (reconstruction). Unit: healthy M_s → slow at ρ for D → policy:
    tolerate: (M_s + ρD)/(M_s + D);  ckpt_restart (on-demand checkpoint + restart, no rollback):
    (M_s + ρD)/(M_s + D + P);  treat_as_stop (checkpoint-and-restart failover with rollback, first order):
    (M_s + ρD − τ/2)/(M_s + D + R). Checkpoint overhead is NOT included here (see ``combined``)."""
    if policy not in SLOW_POLICIES:
        raise ValueError(f"slow policy must be one of {SLOW_POLICIES}, got '{policy}'")
    ms, rho, d, p, delta, repair = _arr(_none_if_inf(slow_mtbf), rho, slow_duration, mitigation, delta, repair)
    if np.any((rho < 0) | (rho > 1)):
        raise ValueError("rho must lie in [0, 1]")
    with np.errstate(invalid="ignore"):
        if policy == "tolerate":
            val = (ms + rho * d) / (ms + d)
        elif policy == "ckpt_restart":
            val = (ms + rho * d) / (ms + d + p)
        else:
            if tau is None:
                raise ValueError("policy treat_as_stop needs the checkpoint interval tau")
            val = (ms + rho * d - np.asarray(tau, dtype=float) / 2) / (ms + d + repair)
    return np.clip(np.where(np.isinf(ms), 1.0, val), 0.0, 1.0)


def combined(tau, delta, repair, mtbf, slow_mtbf, rho, slow_duration, mitigation=0.0,
             policy: str = "tolerate", mtbf_kind: str = "uptime", exact: bool = True):
    """Independent, rare fail-stop and fail-slow: TOR ≈ TOR_stop × TOR_slow (error O(λ_f·λ_s); ours)."""
    stop = (fail_stop_exact if exact else fail_stop_first_order)(tau, delta, repair, mtbf, mtbf_kind)
    return stop * fail_slow(slow_mtbf, rho, slow_duration, mitigation, policy, tau, delta, repair)


def ettr_meta(interval, w_cp, u0, failure_rate):
    """Meta's expected Effective Training Time Ratio (Kokolis et al., arXiv 2410.21680), their approximation

        E[ETTR] ≈ (1 − N·r_f·(u0 + Δt_cp/2)) / (1 + w_cp/Δt_cp)

    with ``failure_rate`` = N·r_f the job's failure rate (nodes × per-node rate, 1/time), ``interval`` = Δt_cp
    the time between checkpoints, ``w_cp`` the (blocking) checkpoint write time and ``u0`` the restart
    overhead. First order in the failure rate: it charges half an interval of rollback, not half a period
    (τ+δ)/2, so it exceeds the exact TOR by ≈ r·δ/2 at small rates. Clipped to [0, 1]."""
    dt, w, u, lam = _arr(interval, w_cp, u0, failure_rate)
    with np.errstate(invalid="ignore", divide="ignore"):
        val = (1 - lam * (u + dt / 2)) / (1 + w / dt)
    return np.clip(val, 0.0, 1.0)


def predicted_t_obs(t_opt, tor):
    """T_obs = T_opt / TOR (paper's definition, eq. 1)."""
    return np.asarray(t_opt, dtype=float) / np.asarray(tor, dtype=float)


def tor_from_estimates(tau: float, delta: float, repair: float, mtbf: float, slow_mtbf: float = 0.0,
                       rho: float = 1.0, slow_duration: float = 0.0, mitigation: float = 0.0,
                       policy: str = "tolerate", mtbf_kind: str = "uptime") -> float:
    """TOR of a job from parameters estimated from its event log (the harness calls this).
    mtbf/slow_mtbf <= 0 or inf mean no such failures."""
    return float(combined(tau, delta, repair, mtbf, slow_mtbf, rho, slow_duration, mitigation, policy,
                          mtbf_kind, exact=True))


# ------------------------------------------------------------------------------ optimal intervals
def young_interval(delta, mtbf):
    """Young (1974): √(2δM)."""
    return np.sqrt(2 * np.asarray(delta, float) * np.asarray(mtbf, float))


def daly_interval(delta, mtbf):
    """Daly (2006) higher order: √(2δM)[1 + (δ/2M)^½/3 + (δ/2M)/9] − δ for δ < 2M, else M."""
    d, m = _arr(delta, mtbf)
    x = d / (2 * m)
    return np.where(d < 2 * m, np.sqrt(2 * d * m) * (1 + np.sqrt(x) / 3 + x / 9) - d, m)


def tor_first_order_interval(delta, mtbf, repair=0.0, mtbf_kind: str = "uptime"):
    """Argmax of the first-order TOR: (τ+δ)² = 2δM_up → τ* = √(2δM_up) − δ (ours; = Daly first order)."""
    m = uptime_mtbf(mtbf, repair, mtbf_kind)
    return np.maximum(np.sqrt(2 * np.asarray(delta, float) * m) - delta, 0.0)


def availability_interval(delta, mtbf, repair):
    """Saxena et al. (NVIDIA, arXiv 2410.18124) availability-optimal Tc = Ts + √(2(Tf+Tr)Ts + Ts²)."""
    d, m, r = _arr(delta, mtbf, repair)
    return d + np.sqrt(2 * (m + r) * d + d * d)


def numeric_interval(delta, repair, mtbf, mtbf_kind: str = "uptime", repair_interruptible: bool = False,
                     commit=None, step_time=None):
    """Maximise the exact TOR over τ ∈ (0, 10·M] (bounded Brent). With ``step_time`` the interval is a whole
    number of steps: the better of ⌊τ*/t⌋ and ⌈τ*/t⌉ steps (at least one)."""
    commit = delta if commit is None else commit
    d, r, m, c = _arr(delta, repair, mtbf, commit)

    def one(dd: float, rr: float, mm: float, cc: float) -> float:
        f = lambda t: -float(fail_stop_exact(t, dd, rr, mm, mtbf_kind, repair_interruptible, cc))  # noqa: E731
        m_up = float(uptime_mtbf(mm, rr, mtbf_kind, repair_interruptible))
        res = minimize_scalar(f, bounds=(1e-9 * m_up, 10 * m_up), method="bounded",
                              options={"xatol": 1e-7 * m_up})
        tau = float(res.x)
        if step_time:
            cands = [max(np.floor(tau / step_time), 1.0) * step_time, max(np.ceil(tau / step_time), 1.0) * step_time]
            tau = min(cands, key=f)
        return tau

    return np.vectorize(one, otypes=[float])(d, r, m, c)


def interval_flatness(tau_opt, delta, repair, mtbf, band: float = 0.3, **kw) -> dict:
    """TOR at τ* and its loss at τ*(1 ± band): how flat the optimum is."""
    best = fail_stop_exact(tau_opt, delta, repair, mtbf, **kw)
    lo = fail_stop_exact(np.asarray(tau_opt) * (1 - band), delta, repair, mtbf, **kw)
    hi = fail_stop_exact(np.asarray(tau_opt) * (1 + band), delta, repair, mtbf, **kw)
    return {"tor": best, "loss_low": best - lo, "loss_high": best - hi}

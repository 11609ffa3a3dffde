"""Monte Carlo / discrete-event simulator of the TOR repeating unit (fail-stop and fail-slow).

Two simulators of the same model:
* ``simulate_fail_stop`` / ``simulate_fail_slow``: vectorised over failure cycles (numpy), renewal-reward
  estimate TOR = Σ useful / Σ cycle length with a delta-method standard error.
* ``simulate_job``: a per-event Python loop over one whole job (T_opt of work) on the wall clock, with
  fail-stop and fail-slow events from a distribution or an explicit list (trace replay, harness replay).
  ``loop_fail_stop_cycles`` is the same per-event loop restricted to the vectorised model (bench peer).

Failures follow the uptime clock (MTBF reading 'uptime'): after every restart a fresh uptime is drawn
(renewal). Every simulated second is booked to exactly one stage and the stages sum to T_obs (asserted).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import gamma as gamma_fn

DISTS = ("exponential", "weibull", "lognormal")
STOP_STAGES = ("useful", "checkpoint", "lost", "repair")
JOB_STAGES = ("startup", "useful", "slow", "checkpoint", "lost", "repair", "mitigation")


def sample_uptimes(rng: np.random.Generator, n: int, mean: float, dist: str = "exponential",
                   shape: float = 1.0) -> np.ndarray:
    """Inter-arrival (uptime) draws with the given mean. weibull: shape k; lognormal: shape = σ."""
    if dist == "exponential":
        return rng.exponential(mean, n)
    if dist == "weibull":
        return mean / gamma_fn(1 + 1 / shape) * rng.weibull(shape, n)
    if dist == "lognormal":
        return rng.lognormal(math.log(mean) - shape**2 / 2, shape, n)
    raise ValueError(f"failure distribution must be one of {DISTS}, got '{dist}'")


@dataclass
class SimResult:
    tor: float
    se: float
    n_cycles: int
    stages: dict                     # total seconds per stage
    t_obs: float

    @property
    def ci95(self) -> tuple[float, float]:
        return self.tor - 1.96 * self.se, self.tor + 1.96 * self.se


def _ratio_estimate(work: np.ndarray, length: np.ndarray) -> tuple[float, float]:
    """Renewal-reward ratio Σw/Σt and its delta-method standard error."""
    tor = work.sum() / length.sum()
    resid = work - tor * length
    return float(tor), float(resid.std(ddof=1) / math.sqrt(len(work)) / length.mean())


def check_invariant(stages: dict, t_obs: np.ndarray | float, rtol: float = 1e-9) -> None:
    """Every second is in exactly one stage: stages are non-negative and sum to T_obs."""
    total = sum(np.asarray(v, dtype=float) for v in stages.values())
    for k, v in stages.items():
        if np.any(np.asarray(v) < -rtol * np.max(np.abs(t_obs))):
            raise AssertionError(f"stage '{k}' has negative time")
    if not np.allclose(total, t_obs, rtol=rtol, atol=rtol * float(np.max(np.abs(t_obs)))):
        raise AssertionError("stage times do not sum to T_obs")


def _repair_times(rng, n, repair, mtbf, dist, shape, interruptible) -> np.ndarray:
    """Repair duration per cycle; if failures can hit repair, a failure restarts it (Daly's model)."""
    total = np.full(n, float(repair))
    if not interruptible or repair <= 0:
        return total
    total[:] = 0.0
    pending = np.arange(n)
    while pending.size:
        x = sample_uptimes(rng, pending.size, mtbf, dist, shape)
        done = x >= repair
        total[pending[done]] += repair
        total[pending[~done]] += x[~done]
        pending = pending[~done]
    return total


def fail_stop_cycle_stages(x, tau, delta, commit, repair_t) -> dict:
    """Stage seconds of fail-stop cycles with uptimes x (periods P = τ+δ; checkpoint j durable at
    (j−1)P + τ + commit)."""
    p = tau + delta
    full, rem = np.divmod(x, p)
    durable = np.where(x >= tau + commit, np.floor((x - tau - commit) / p) + 1, 0.0)
    useful = durable * tau
    ckpt = full * delta + np.maximum(rem - tau, 0.0)
    return {"useful": useful, "checkpoint": ckpt, "lost": x - useful - ckpt, "repair": repair_t}


def simulate_fail_stop(tau: float, delta: float, repair: float, mtbf: float, n_cycles: int = 100_000,
                       seed: int = 0, dist: str = "exponential", shape: float = 1.0,
                       repair_interruptible: bool = False, commit: float | None = None,
                       chunk: int = 1_000_000) -> SimResult:
    """Vectorised Monte Carlo of the fail-stop unit: uptime X → rollback → repair R."""
    commit = delta if commit is None else commit
    if commit < delta:
        raise ValueError("commit time must be >= delta")
    rng = np.random.default_rng(seed)
    work, length, totals = [], [], dict.fromkeys(STOP_STAGES, 0.0)
    for start in range(0, n_cycles, chunk):
        n = min(chunk, n_cycles - start)
        x = sample_uptimes(rng, n, mtbf, dist, shape)
        st = fail_stop_cycle_stages(x, tau, delta, commit,
                                    _repair_times(rng, n, repair, mtbf, dist, shape, repair_interruptible))
        cyc = x + st["repair"]
        check_invariant(st, cyc)
        work.append(st["useful"])
        length.append(cyc)
        for k in STOP_STAGES:
            totals[k] += float(st[k].sum())
    w, t = np.concatenate(work), np.concatenate(length)
    tor, se = _ratio_estimate(w, t)
    return SimResult(tor, se, n_cycles, totals, float(t.sum()))


def simulate_fail_slow(slow_mtbf: float, rho: float, slow_duration: float, mitigation: float = 0.0,
                       policy: str = "tolerate", n_cycles: int = 100_000, seed: int = 0,
                       dist: str = "exponential", shape: float = 1.0) -> SimResult:
    """Vectorised fail-slow unit: healthy H ~ dist(M_s) → slow at ρ for D → mitigation P (ckpt_restart)."""
    if policy not in ("tolerate", "ckpt_restart"):
        raise ValueError("vectorised fail-slow supports tolerate/ckpt_restart; use simulate_job for treat_as_stop")
    rng = np.random.default_rng(seed)
    h = sample_uptimes(rng, n_cycles, slow_mtbf, dist, shape)
    d = np.full(n_cycles, float(slow_duration))
    p = np.full(n_cycles, float(mitigation if policy == "ckpt_restart" else 0.0))
    st = {"useful": h, "slow": d, "mitigation": p}
    cyc = h + d + p
    check_invariant(st, cyc)
    tor, se = _ratio_estimate(h + rho * d, cyc)
    return SimResult(tor, se, n_cycles, {k: float(v.sum()) for k, v in st.items()}, float(cyc.sum()))


def loop_fail_stop_cycles(tau: float, delta: float, repair: float, mtbf: float, n_cycles: int, seed: int = 0,
                          commit: float | None = None) -> SimResult:
    """Straightforward per-event Python loop of the vectorised fail-stop model (cross-check, bench peer)."""
    commit = delta if commit is None else commit
    rng = np.random.default_rng(seed)
    xs = rng.exponential(mtbf, n_cycles)
    totals = dict.fromkeys(STOP_STAGES, 0.0)
    work, length = np.empty(n_cycles), np.empty(n_cycles)
    for i, x in enumerate(xs):
        t = useful = ckpt = 0.0
        while True:                                   # one event per healthy segment / checkpoint
            if t + tau > x:
                break
            t += tau
            save_end = t + delta
            if save_end > x:
                ckpt += x - t
                break
            ckpt += delta
            if t + commit <= x:
                useful += tau
            t = save_end
        lost = x - useful - ckpt
        for k, v in zip(STOP_STAGES, (useful, ckpt, lost, repair)):
            totals[k] += v
        work[i], length[i] = useful, x + repair
    tor, se = _ratio_estimate(work, length)
    return SimResult(tor, se, n_cycles, totals, float(length.sum()))


# ------------------------------------------------------------------------------ whole-job simulator
@dataclass
class FaultEvent:
    time: float                       # wall-clock seconds since job start (onset)
    kind: str                         # 'fail_stop' or 'fail_slow'
    rho: float = 1.0                  # fail-slow: preservation ratio
    duration: float = 0.0             # fail-slow: time slow (until it ends or is detected)


@dataclass
class JobResult:
    t_opt: float
    t_obs: float
    stages: dict = field(default_factory=dict)
    n_fail_stop: int = 0
    n_fail_slow: int = 0

    @property
    def tor(self) -> float:
        return self.t_opt / self.t_obs


def simulate_job(t_opt: float, tau: float, delta: float, repair: float, *, events: list[FaultEvent] | None = None,
                 mtbf: float = 0.0, slow_mtbf: float = 0.0, rho: float = 1.0, slow_duration: float = 0.0,
                 mitigation: float = 0.0, policy: str = "tolerate", startup: float = 0.0,
                 commit: float | None = None, repair_interruptible: bool = False, dist: str = "exponential",
                 shape: float = 1.0, seed: int = 0, max_events: int = 10_000_000) -> JobResult:
    """Per-event simulation of one job until T_opt of work is done.

    Faults come from ``events`` (explicit wall-clock list: trace or harness replay) or are drawn: fail-stops
    after an uptime ~ dist(mtbf) since each restart, fail-slow onsets ~ Exp(slow_mtbf) gaps. Slow windows
    lower the healthy rate to ρ; policies: tolerate; ckpt_restart (after D, mitigation P at r=0 with an
    on-demand checkpoint, no rollback); treat_as_stop (after D, rollback to the last durable checkpoint and
    repair R). Explicit fail-stops that land in a repair restart it only if ``repair_interruptible``."""
    commit = delta if commit is None else commit
    rng = np.random.default_rng(seed)
    st = dict.fromkeys(JOB_STAGES, 0.0)
    explicit = events is not None
    stops = sorted(e.time for e in events if e.kind == "fail_stop") if explicit else []
    slows = sorted((e.time, e.duration, e.rho) for e in events if e.kind == "fail_slow") if explicit else []
    n_stop = n_slow = 0

    def next_draw_stop(now: float) -> float:
        return now + float(sample_uptimes(rng, 1, mtbf, dist, shape)[0]) if mtbf > 0 else math.inf

    def next_draw_slow(now: float) -> tuple:
        if slow_mtbf <= 0:
            return (math.inf, 0.0, 1.0)
        return (now + float(rng.exponential(slow_mtbf)), slow_duration, rho)

    now = startup
    st["startup"] = startup
    next_stop = (stops.pop(0) if stops else math.inf) if explicit else next_draw_stop(now)
    next_slow = (slows.pop(0) if slows else (math.inf, 0.0, 1.0)) if explicit else next_draw_slow(now)
    done = 0.0                       # durable work (optimal-time units)
    pend = {"useful": 0.0, "slow": 0.0}   # seconds since the last durable checkpoint, and their work
    pend_work = 0.0
    since_ckpt = 0.0                 # work since the last checkpoint start
    slow_until, slow_rho = -math.inf, 1.0

    for _ in range(max_events):
        remaining = t_opt - done - pend_work
        if remaining <= 1e-12 * t_opt:
            break
        in_slow = now < slow_until
        rate = slow_rho if in_slow else 1.0
        # time until the next checkpoint / job end at the current rate, or until the rate changes
        work_goal = min(tau - since_ckpt, remaining)
        t_goal = now + work_goal / rate
        # events that fell inside a repair / mitigation / save take effect as soon as training resumes
        t_rate = max(slow_until if in_slow else next_slow[0], now)
        t_stop = max(next_stop, now)
        t_next = min(t_goal, t_rate, t_stop)
        dt = t_next - now
        key = "slow" if rate < 1.0 else "useful"
        pend[key] += dt
        pend_work += dt * rate
        since_ckpt += dt * rate
        now = t_next
        if t_next == t_stop:                             # fail-stop
            n_stop += 1
            st["lost"] += pend["useful"] + pend["slow"]
            pend["useful"] = pend["slow"] = pend_work = since_ckpt = 0.0
            slow_until = -math.inf                       # restart clears a slow node
            end = now + repair
            if explicit:
                next_stop = stops.pop(0) if stops else math.inf
                while next_stop < end:                   # faults during repair
                    if repair_interruptible:
                        n_stop += 1
                        end = next_stop + repair
                    next_stop = stops.pop(0) if stops else math.inf
            else:
                while repair_interruptible and mtbf > 0:
                    x = float(sample_uptimes(rng, 1, mtbf, dist, shape)[0])
                    if now + x >= end:
                        break
                    n_stop += 1
                    end = now + x + repair
                    now = now + x                        # (book below from the original start)
            st["repair"] += end - t_next
            now = end
            if not explicit:
                next_stop = next_draw_stop(now)
            continue
        if in_slow and t_next == t_rate:                 # slow window ends (ended or detected)
            slow_until = -math.inf
            if policy == "ckpt_restart":
                st["mitigation"] += mitigation
                now += mitigation                        # on-demand checkpoint: nothing rolls back
                st["useful"] += pend["useful"]
                st["slow"] += pend["slow"]
                done += pend_work
                pend["useful"] = pend["slow"] = pend_work = since_ckpt = 0.0
            elif policy == "treat_as_stop":
                st["lost"] += pend["useful"] + pend["slow"]
                pend["useful"] = pend["slow"] = pend_work = since_ckpt = 0.0
                st["repair"] += repair
                now += repair
                if not explicit:
                    next_stop = next_draw_stop(now)
            if not explicit:
                next_slow = next_draw_slow(now)
            else:
                next_slow = slows.pop(0) if slows else (math.inf, 0.0, 1.0)
            continue
        if not in_slow and t_next == t_rate and t_next != t_goal:   # slow window starts
            n_slow += 1
            slow_until, slow_rho = next_slow[0] + next_slow[1], next_slow[2]   # window end is absolute
            if slow_until <= now:                        # zero-length window: nothing to do
                slow_until = -math.inf
                next_slow = (slows.pop(0) if slows else (math.inf, 0.0, 1.0)) if explicit else next_draw_slow(now)
            continue
        if t_next == t_goal:
            if t_opt - done - pend_work <= 1e-12 * t_opt:
                break                                    # job finished: final work needs no checkpoint
            # checkpoint: blocking δ, durable after `commit`
            if now + delta > next_stop:                  # failure during the save: handled next loop
                st["checkpoint"] += next_stop - now
                now = next_stop
                since_ckpt = tau                         # stays at a checkpoint boundary
                continue
            st["checkpoint"] += delta
            if now + commit <= next_stop:
                st["useful"] += pend["useful"]
                st["slow"] += pend["slow"]
                done += pend_work
                pend["useful"] = pend["slow"] = pend_work = 0.0
            now += delta
            since_ckpt = 0.0
    else:
        raise RuntimeError(f"simulate_job did not finish within {max_events} events")
    st["useful"] += pend["useful"]
    st["slow"] += pend["slow"]
    done += pend_work
    check_invariant(st, now)
    return JobResult(t_opt=done, t_obs=now, stages=st, n_fail_stop=n_stop, n_fail_slow=n_slow)


# ------------------------------------------------------------------------------------ trace replay
def load_trace(path: str | Path) -> list[FaultEvent]:
    """CSV with header ``time,kind[,rho,duration]``: time = wall-clock seconds since job start, kind =
    fail_stop | fail_slow. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: trace file not found")
    out: list[FaultEvent] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"time", "kind"} <= set(reader.fieldnames):
            raise ValueError(f"{path}:1: header must contain 'time' and 'kind' (got {reader.fieldnames})")
        for row in reader:
            line = reader.line_num
            try:
                t = float(row["time"])
                kind = (row["kind"] or "").strip()
                rho = float(row.get("rho") or 1.0)
                dur = float(row.get("duration") or 0.0)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: bad number ({exc})") from None
            if kind not in ("fail_stop", "fail_slow"):
                raise ValueError(f"{path}:{line}: kind must be fail_stop or fail_slow, got '{kind}'")
            if not math.isfinite(t) or t < 0:
                raise ValueError(f"{path}:{line}: time must be a finite number >= 0, got {row['time']}")
            if not 0 <= rho <= 1 or dur < 0:
                raise ValueError(f"{path}:{line}: need 0 <= rho <= 1 and duration >= 0")
            out.append(FaultEvent(t, kind, rho, dur))
    return out


def replay_harness(T_opt: float, tau: float, delta: float, repair: float, startup: float, rho: float,  # noqa: N803
                   fail_stop: list[dict], fail_slow: list[dict]) -> float:
    """Deterministic TOR prediction of one harness run: replay its exact injected faults (job-clock times)
    with its estimated parameters. fail_stop: [{'time': s, ...}]; fail_slow: [{'start','duration','rho'}]."""
    events = [FaultEvent(float(e["time"]), "fail_stop") for e in fail_stop]
    events += [FaultEvent(float(w["start"]), "fail_slow", float(w.get("rho", rho)), float(w["duration"]))
               for w in fail_slow]
    return simulate_job(T_opt, tau, delta, repair, events=events, startup=startup).tor

"""From the harness's event logs to TOR: stage times, estimated parameters, r(t), and the identity.

Every second of the job, from ``job_start`` to ``job_end``, is booked to exactly one stage by walking
the merged, time-sorted supervisor + trainer events:

- ``useful``: step intervals whose step survives in the final lineage (each of steps 1..N exactly
  once). Each contributes ``t_step_opt`` to T_opt; the rest of its duration goes to ``slow_deficit``
  (steps inside a fail-slow window), to ``repair`` (the first step after a restart: warm-up is part of
  R, as in §4.4 of the project's TOR research note) or to ``jitter`` (healthy steps, +/- around
  ``t_step_opt``);
- ``save``: checkpoint_begin -> checkpoint_end (blocking saves);
- ``lost``: steps later rolled back (beyond the checkpoint the next attempt resumed from), and the
  partial step cut by the kill;
- ``repair``: fault -> detected -> injected repair -> relaunch -> model built and checkpoint loaded,
  plus the first-step warm-up; ``startup``: the first launch's start-up (one-off, not a failure cost);
- ``other``: small bookkeeping gaps (e.g. between the last step and train_end).

T_obs runs from ``job_start`` to the final ``train_end`` (step N done and saved); process teardown
after that is not training time.

So T_obs = T_opt + save + lost + repair + startup + slow_deficit + jitter + other holds exactly by
construction; the *accounting identity* the issue asks for, T_obs = T_opt + save + lost + repair +
slow_deficit (with the one-off startup counted with repair), closes up to jitter + other, which
``analyze`` reports as ``identity_residual`` and ``check_identity`` bounds.

``t_step_opt`` (the optimal step time, 1/W_opt) is the MEAN duration of the healthy, non-first steps of
the final lineage (or a value measured by a clean calibration run). The mean, not the median: a failure-
free run on the same machine takes n × the mean step, and on a loaded machine step times are skewed to the
right (pre-empted steps), so the median would book ordinary step-time variance as overhead ("jitter") and
the identity would miss by Σ(step − median). With the mean the healthy steps' jitter is zero by
construction; their variance is reported instead (``t_step_std``, and ``T_opt_se`` = n·std/√n_healthy, the
standard error of T_opt), next to the median reading (``t_step_median``, ``tor_median_step``,
``jitter_median``: what the median would have booked as jitter).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

STAGES = ("useful", "save", "lost", "repair", "startup", "slow_deficit", "jitter", "other")


@dataclass
class HarnessAnalysis:
    n_steps: int
    t_step_opt: float                   # mean healthy step (or the calibration value passed in)
    T_opt: float
    T_obs: float
    tor: float
    stages: dict[str, float]            # seconds per stage (useful = T_opt exactly)
    identity_residual: float            # T_obs - (T_opt + save + lost + repair + startup + slow_deficit)
    n_fail_stop: int
    n_fail_slow: int                    # fail-slow windows that began within the training time (uptime)
    n_slow_steps: int                   # surviving steps run inside a window (0: rho not observable)
    delta: float                        # mean blocking checkpoint time (s)
    tau: float                          # healthy compute between checkpoints (s)
    repair: float                       # mean repair time per fail-stop (s)
    mtbf_uptime: float                  # uptime / #fail-stops (interpretation A)
    mtbf_wall: float                    # wall clock / #fail-stops (interpretation B)
    rho: float                          # step-rate ratio while slow
    slow_duration: float                # mean time spent slow per fail-slow window (s)
    startup: float
    final_loss: float
    weights_sha256: str
    t_step_median: float = 0.0          # median healthy step (the former estimator, reported alongside)
    t_step_std: float = 0.0             # sample std of the healthy steps (step-time variance, counted)
    n_healthy_steps: int = 0
    T_opt_se: float = 0.0               # standard error of T_opt = n·t_step_std/√n_healthy
    tor_median_step: float = 0.0        # TOR if T_opt were n × the median step
    jitter_median: float = 0.0          # Σ(healthy step − median): the jitter the median reading books
    r_segments: list[tuple[float, float, float]] = field(default_factory=list)  # (t0, t1, r) job clock

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("r_segments")
        return d


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                # the last line of a killed writer may be cut; anything else is a real error
                if line.endswith("\n"):
                    raise ValueError(f"{path}:{lineno}: corrupt event line") from None
    return out


def load_events(run_dir: str | Path) -> list[dict]:
    run = Path(run_dir)
    sup = [{**e, "src": "supervisor"} for e in _read_jsonl(run / "supervisor_events.jsonl")]
    tr = [{**e, "src": "trainer"} for e in _read_jsonl(run / "trainer_events.jsonl")]
    order = {"supervisor": 0, "trainer": 1}
    return sorted(sup + tr, key=lambda e: (e["time"], order[e["src"]]))


def _resume_steps(events: list[dict]) -> dict[int, int]:
    """Step each attempt resumed from = the step of its train_begin."""
    return {e["attempt"]: e["step"] for e in events if e["event"] == "train_begin"}


def _rho(useful: list, t_opt: float) -> float:
    """Step-rate ratio while slow: t_opt over the mean slow step. The first step of an attempt also carries
    start-up work, so it is left out unless it is the only slow step; a window can fall wholly in a repair
    or on rolled-back steps, and then nothing slow was observed (rho = 1)."""
    slow = [(t1 - t0, first) for t0, t1, e, first in useful if e.get("slow")]
    steady = [d for d, first in slow if not first] or [d for d, _ in slow]
    return t_opt / statistics.fmean(steady) if steady else 1.0


def analyze(run_dir: str | Path, t_step_opt: float | None = None) -> HarnessAnalysis:
    events = load_events(run_dir)
    if not events or events[0]["event"] != "job_start" or events[-1]["event"] != "job_end":
        raise ValueError(f"{run_dir}: event log does not span job_start..job_end (job unfinished?)")
    # T_obs ends when step N is done and durably saved (the final train_end), not at interpreter exit
    last_end = max(i for i, e in enumerate(events) if e["event"] == "train_end")
    events = events[: last_end + 1]
    resume = _resume_steps(events)
    attempts = sorted(resume)
    final_attempt = attempts[-1]
    # a step of attempt a survives iff a is final or the next attempt resumed at or after it
    survives = {a: (resume[attempts[i + 1]] if i + 1 < len(attempts) else float("inf"))
                for i, a in enumerate(attempts)}

    step_iv: list[tuple[float, float, dict, bool]] = []   # (t0, t1, step event, first-after-begin)
    booked: dict[str, float] = defaultdict(float)
    state, t_prev, first_step = "startup", events[0]["time"], False
    for e in events[1:]:
        dt = e["time"] - t_prev
        ev = e["event"]
        if state == "step" and ev == "step_end":
            step_iv.append((t_prev, e["time"], e, first_step))
            first_step = False
        elif state == "step" and ev == "fault":
            booked["lost"] += dt  # the partial step cut by the kill
        elif state == "step":
            booked["save" if ev == "checkpoint_begin" else "other"] += dt
        else:
            booked[state] += dt
        if ev == "train_begin":
            state, first_step = "step", True
        elif ev in ("step_end", "checkpoint_end"):
            state = "step"
        elif ev == "checkpoint_begin":
            state = "save"
        elif ev in ("train_end",):
            state = "other"
        elif ev in ("fault", "detected", "repair_end"):
            state = "repair"
        elif ev == "spawn" and e["attempt"] > 0:
            state = "repair"
        t_prev = e["time"]

    useful = [(t0, t1, e, first) for t0, t1, e, first in step_iv if e["step"] <= survives[e["attempt"]]]
    lost = [(t0, t1) for t0, t1, e, _ in step_iv if e["step"] > survives[e["attempt"]]]
    steps_done = sorted(e["step"] for _, _, e, _ in useful)
    n = len(steps_done)
    if steps_done != list(range(1, n + 1)):
        raise ValueError(f"{run_dir}: final lineage does not cover steps 1..{n} exactly once")
    healthy = [t1 - t0 for t0, t1, e, first in useful if not first and not e.get("slow")]
    if not healthy and t_step_opt is None:
        raise ValueError(f"{run_dir}: no healthy step (every surviving step is a first step or slow): "
                         "pass t_step_opt from a calibration run")
    median = statistics.median(healthy) if healthy else t_step_opt
    std = statistics.stdev(healthy) if len(healthy) > 1 else 0.0
    # the mean: healthy steps then book no jitter, the variance is reported (see the module docstring)
    t_opt = t_step_opt if t_step_opt is not None else statistics.fmean(healthy)
    booked["lost"] += sum(t1 - t0 for t0, t1 in lost)
    slow_time, segments = 0.0, []
    for t0, t1, e, first in useful:
        extra = (t1 - t0) - t_opt
        if e.get("slow"):
            booked["slow_deficit"] += extra
            slow_time += t1 - t0
        elif first and e["attempt"] > 0:
            booked["repair"] += extra
        elif first:
            booked["startup"] += extra
        else:
            booked["jitter"] += extra
        segments.append((t0, t1, t_opt / (t1 - t0)))
    booked["useful"] = n * t_opt

    job_start = events[0]["time"]
    T_obs = events[-1]["time"] - job_start
    stages = {k: float(booked.get(k, 0.0)) for k in STAGES}
    total = sum(stages.values())
    if abs(total - T_obs) > 1e-6 * max(T_obs, 1.0):
        raise AssertionError(f"stage booking does not sum to T_obs: {total} vs {T_obs}")
    T_opt = n * t_opt
    faults = [e for e in events if e["event"] == "fault"]
    saves = _pairs(events, "checkpoint_begin", "checkpoint_end")
    uptime = _uptime(events)
    slow_windows = json.loads((Path(run_dir) / "slow_schedule.json").read_text()) \
        if (Path(run_dir) / "slow_schedule.json").exists() else []
    slow_hit = [w for w in slow_windows if w["start"] < uptime]   # windows are on the training clock
    end = [e for e in events if e["event"] == "train_end" and e["attempt"] == final_attempt][-1]
    repair_cost = stages["repair"]
    return HarnessAnalysis(
        n_steps=n, t_step_opt=t_opt, T_opt=T_opt, T_obs=T_obs, tor=T_opt / T_obs, stages=stages,
        identity_residual=T_obs - (T_opt + stages["save"] + stages["lost"] + stages["repair"]
                                   + stages["startup"] + stages["slow_deficit"]),
        n_fail_stop=len(faults), n_fail_slow=len(slow_hit),
        n_slow_steps=sum(1 for _, _, e, _ in useful if e.get("slow")),
        delta=statistics.fmean(saves) if saves else 0.0,
        tau=_checkpoint_every(run_dir) * t_opt,
        repair=repair_cost / len(faults) if faults else 0.0,
        mtbf_uptime=uptime / len(faults) if faults else float("inf"),
        mtbf_wall=T_obs / len(faults) if faults else float("inf"),
        rho=_rho(useful, t_opt),
        slow_duration=slow_time / len(slow_hit) if slow_hit else 0.0,
        startup=stages["startup"], final_loss=float(end["loss"]), weights_sha256=end["weights_sha256"],
        r_segments=[(t0 - job_start, t1 - job_start, r) for t0, t1, r in segments],
        t_step_median=median, t_step_std=std, n_healthy_steps=len(healthy),
        T_opt_se=n * std / len(healthy) ** 0.5 if healthy else 0.0,
        tor_median_step=n * median / T_obs, jitter_median=sum(d - median for d in healthy),
    )


def _pairs(events: list[dict], begin: str, end: str) -> list[float]:
    out, t0 = [], None
    for e in events:
        if e["event"] == begin:
            t0 = e["time"]
        elif e["event"] == end and t0 is not None:
            out.append(e["time"] - t0)
            t0 = None
        elif e["event"] == "fault":
            t0 = None
    return out


def _uptime(events: list[dict]) -> float:
    """Time spent training (train_begin -> fault or train_end), summed over attempts: the fault clock."""
    out, began = 0.0, None
    for e in events:
        if e["event"] == "train_begin":
            began = e["time"]
        elif e["event"] in ("fault", "train_end") and began is not None:
            out += e["time"] - began
            began = None
    return out


def training_segments(events: list[dict]) -> list[tuple[float, float, float]]:
    """(job-clock start, job-clock end, training clock at the start) of each attempt's training, train_begin
    to its fault or train_end: the map between the training (uptime) clock and the job clock."""
    job_start = events[0]["time"]
    out, began, clock = [], None, 0.0
    for e in events:
        if e["event"] == "train_begin":
            began = e["time"]
        elif e["event"] in ("fault", "train_end") and began is not None:
            out.append((began - job_start, e["time"] - job_start, clock))
            clock += e["time"] - began
            began = None
    return out


def job_clock_windows(events: list[dict], windows: list[dict]) -> list[dict]:
    """Fail-slow windows drawn on the training clock, as they fell on the job clock: a window cut by a
    fault continues when the next attempt trains, so it can map to several pieces; windows (or parts)
    beyond the job's training time are dropped. Each piece: {'start', 'duration', 'rho', 'window'}."""
    out = []
    for k, w in enumerate(windows):
        s0, s1 = float(w["start"]), float(w["start"]) + float(w["duration"])
        for j0, j1, c in training_segments(events):
            lo, hi = max(s0, c), min(s1, c + (j1 - j0))
            if hi > lo:
                out.append({"start": j0 + lo - c, "duration": hi - lo, "rho": w["rho"], "window": k})
    return out


def _checkpoint_every(run_dir: str | Path) -> int:
    return int(json.loads((Path(run_dir) / "harness_config.json").read_text())["checkpoint_every"])


def check_identity(a: HarnessAnalysis, rel_tol: float = 0.05) -> None:
    """The accounting identity closes: |T_obs - (T_opt + save + lost + repair + slow deficit)| <= tol*T_obs."""
    if abs(a.identity_residual) > rel_tol * a.T_obs:
        raise AssertionError(f"accounting identity off by {a.identity_residual:.3f} s "
                             f"(> {rel_tol:.0%} of T_obs={a.T_obs:.2f} s); stages: {a.stages}")


def r_timeline(a: HarnessAnalysis, n_bins: int = 200) -> list[tuple[float, float]]:
    """r(t) averaged over ``n_bins`` equal bins of [0, T_obs]: (bin centre, mean r). ∫ r dt = T_opt."""
    width = a.T_obs / n_bins
    acc = [0.0] * n_bins
    for t0, t1, r in a.r_segments:
        b0, b1 = int(t0 // width), min(int(t1 // width), n_bins - 1)
        for b in range(b0, b1 + 1):
            lo, hi = max(t0, b * width), min(t1, (b + 1) * width)
            if hi > lo:
                acc[b] += r * (hi - lo)
    return [((b + 0.5) * width, acc[b] / width) for b in range(n_bins)]

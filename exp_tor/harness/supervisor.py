"""Fault-injecting supervisor: runs ``trainer.py`` to completion while killing it at random times.

Fail-stop faults: after each attempt's ``train_begin`` the supervisor draws an exponential uptime
(mean ``mtbf_s``) and SIGKILLs the trainer when it is reached; it notices the death (``detected``),
waits an injected repair time (``repair_s``: node replacement / rescheduling) and relaunches. The fault
clock runs only while the trainer is training (MTBF interpretation A, uptime; repair is not
interruptible), which is the model ``tor.py`` calls ``mtbf_kind="uptime"``.

Fail-slow faults: windows (start, duration, rho) on the *training clock* (the same uptime clock as the
fail-stop faults: seconds spent training, summed over attempts; it stops during start-up and repair),
drawn up front — onsets a Poisson process of rate ``1/slow_mtbf_s`` in the healthy training time, each
window lasting ``slow_duration_s`` of training time — and written to ``slow_schedule.json`` for the
trainer to apply. On the job (wall) clock a window could fall wholly in a cold start-up or a repair, so
that rho was not observable in a short run; on the training clock every window falls on steps (a fault
inside one pauses it until the next attempt trains). Each attempt learns where the clock stands from
the supervisor (``TOR_TRAIN_CLOCK``: the uptime of the earlier attempts, train_begin to fault, as
``analyze`` counts it); ``run_job`` returns the windows as drawn and as they fell on the job clock.

Restarts are ``cold`` (a fresh interpreter per attempt: imports, model build, checkpoint load — what a
rescheduled job pays) or ``warm`` (the attempt is forked from a multiprocessing forkserver that imported
torch, transformers' GPT-2 and accelerate once, like a standby process kept ready; the restart still
builds the model, sets up accelerate and loads the checkpoint). Either way the time from spawn to the
first step is measured and booked to repair (or start-up for the first launch), never assumed.

Supervisor events go to ``<run_dir>/supervisor_events.jsonl``: job_start, spawn, fault, detected,
repair_end, job_end. The exact injected times are also returned for replay in the simulator.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class HarnessConfig:
    steps: int = 300                # optimizer steps of the whole job (N)
    checkpoint_every: int = 25      # steps between checkpoints (tau in steps)
    batch_size: int = 8
    seq_len: int = 64
    n_seqs: int = 2048
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    lr: float = 1e-3
    corpus: str = "en/tinyshakespeare"
    seed: int = 0
    threads: int = 1
    extra_checkpoint_delay_s: float = 0.0   # added to every checkpoint save (emulates slower storage)
    mtbf_s: float = 0.0             # mean uptime between fail-stop faults; 0 = none
    repair_s: float = 1.0           # injected repair time after a fault is detected
    slow_mtbf_s: float = 0.0        # mean healthy training time between fail-slow windows; 0 = none
    slow_duration_s: float = 3.0    # D, in training time
    slow_rho: float = 0.5           # step rate while slow, as a fraction of healthy
    fault_seed: int = 1             # fault draws are seeded apart from training (common random numbers)
    restart: str = "cold"           # "cold": new interpreter per attempt; "warm": fork from a preloaded forkserver
    max_attempts: int = 50
    attempt_timeout_s: float = 600.0


class _Log:
    def __init__(self, path: Path) -> None:
        self.f = open(path, "a", buffering=1, encoding="utf-8")

    def __call__(self, event: str, **info) -> float:
        t = time.time()
        self.f.write(json.dumps({"event": event, "time": t, **info}) + "\n")
        self.f.flush()
        return t


def _trainer_began(events: Path, attempt: int, offset: int) -> tuple[float | None, int]:
    """Scan new lines of the trainer log for this attempt's train_begin; (its time or None, new offset)."""
    if not events.exists():
        return None, offset
    with open(events, encoding="utf-8") as f:
        f.seek(offset)
        chunk = f.read()
    lines = chunk.split("\n")
    complete, rest = lines[:-1], lines[-1]
    for line in complete:
        rec = json.loads(line)
        if rec["event"] == "train_begin" and rec["attempt"] == attempt:
            return float(rec["time"]), offset + len(chunk) - len(rest)
    return None, offset + len(chunk) - len(rest)


# Variables a distributed launch (torchrun, `accelerate launch`) sets. A trainer is a process of its own: with
# them inherited, its Accelerator would join the launch's process group and wait there for ever.
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
              "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def without_launch_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` less the distributed launch's variables (``LAUNCH_ENV``, ``TORCHELASTIC_*``)."""
    return {k: v for k, v in env.items() if k not in LAUNCH_ENV and not k.startswith("TORCHELASTIC_")}


# What a warm restart has already imported (the trainer imports transformers lazily when it builds the model).
WARM_PRELOAD = ["exp_tor.harness.trainer", "common.train", "accelerate", "transformers",
                "transformers.models.gpt2.modeling_gpt2"]


class _Attempt:
    """One trainer process, cold (``subprocess``) or warm (forked by the forkserver): poll / kill."""

    def __init__(self, cfg: HarnessConfig, run: Path, attempt: int, job_start: float, env: dict,
                 train_clock: float = 0.0) -> None:
        log_path = run / f"trainer_attempt{attempt}.log"
        if cfg.restart == "warm":
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(WARM_PRELOAD)
            from exp_tor.harness.trainer import run_attempt

            self.proc = ctx.Process(target=run_attempt,
                                    args=(str(run), attempt, job_start, str(log_path), train_clock))
            self.proc.start()
        else:
            with open(log_path, "w") as out:
                self.proc = subprocess.Popen([sys.executable, "-m", "exp_tor.harness.trainer", str(run)],
                                             env=env, stdout=out, stderr=subprocess.STDOUT)

    def poll(self) -> int | None:
        return self.proc.exitcode if isinstance(self.proc, mp.process.BaseProcess) else self.proc.poll()

    def kill(self) -> None:
        self.proc.kill()
        if isinstance(self.proc, mp.process.BaseProcess):
            self.proc.join()
        else:
            self.proc.wait()


def slow_windows(cfg: HarnessConfig, horizon_s: float, rng: np.random.Generator) -> list[dict]:
    """Fail-slow windows on the training clock up to ``horizon_s``: exponential healthy gaps (mean
    ``slow_mtbf_s``), each followed by a window of ``slow_duration_s`` — the renewal unit M_s + D of
    ``tor.fail_slow``."""
    if cfg.slow_mtbf_s <= 0:
        return []
    out, t = [], 0.0
    while True:
        t += rng.exponential(cfg.slow_mtbf_s)
        if t > horizon_s:
            return out
        out.append({"start": t, "duration": cfg.slow_duration_s, "rho": cfg.slow_rho})
        t += cfg.slow_duration_s


def run_job(cfg: HarnessConfig, run_dir: str | Path, slow_horizon_s: float = 600.0) -> dict:
    """Run one fault-injected training job to completion; returns the injected schedule and paths.

    ``slow_horizon_s``: fail-slow windows are drawn up to this much training time (job clock in the
    return value: ``fail_slow_job_clock``, the windows' parts that fell on training, job-start relative)."""
    if cfg.restart not in ("cold", "warm"):
        raise ValueError(f"key 'restart' must be 'cold' or 'warm', got {cfg.restart!r}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "harness_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    rng = np.random.default_rng(cfg.fault_seed)
    slow = slow_windows(cfg, slow_horizon_s, np.random.default_rng(cfg.fault_seed + 10_000))
    (run / "slow_schedule.json").write_text(json.dumps(slow))
    log = _Log(run / "supervisor_events.jsonl")
    trainer_events = run / "trainer_events.jsonl"
    job_start = log("job_start")
    env = dict(without_launch_env(dict(os.environ)), TOR_JOB_START=repr(job_start),
               OMP_NUM_THREADS=str(cfg.threads), TOKENIZERS_PARALLELISM="false")
    faults: list[dict] = []
    offset = 0
    train_clock = 0.0   # uptime of the finished attempts: where the next attempt's training clock starts
    for attempt in range(cfg.max_attempts):
        env["TOR_ATTEMPT"] = str(attempt)
        env["TOR_TRAIN_CLOCK"] = repr(train_clock)
        log("spawn", attempt=attempt, train_clock=train_clock)
        proc = _Attempt(cfg, run, attempt, job_start, env, train_clock)
        kill_after = rng.exponential(cfg.mtbf_s) if cfg.mtbf_s > 0 else float("inf")
        began_at = t_begin = None
        deadline = time.time() + cfg.attempt_timeout_s
        while proc.poll() is None:
            if began_at is None:
                t_begin, offset = _trainer_began(trainer_events, attempt, offset)
                if t_begin is not None:
                    began_at = time.time()
            elif time.time() - began_at >= kill_after:
                t_fault = log("fault", attempt=attempt, kind="fail_stop", uptime_s=time.time() - began_at)
                train_clock += t_fault - t_begin   # train_begin (trainer's time) to fault, as analyze counts it
                proc.kill()  # SIGKILL
                log("detected", attempt=attempt)
                faults.append({"time": t_fault - job_start, "uptime_s": kill_after, "attempt": attempt})
                time.sleep(cfg.repair_s)
                log("repair_end", attempt=attempt)
                break
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"trainer attempt {attempt} exceeded {cfg.attempt_timeout_s} s; "
                                   f"see {run / f'trainer_attempt{attempt}.log'}")
            time.sleep(0.005)
        else:
            if proc.poll() != 0:
                raise RuntimeError(f"trainer attempt {attempt} failed with exit code {proc.poll()}; "
                                   f"see {run / f'trainer_attempt{attempt}.log'}")
            log("job_end", attempts=attempt + 1)
            from exp_tor.harness.analyze import job_clock_windows, load_events

            return {"run_dir": str(run), "fail_stop": faults, "fail_slow": slow, "attempts": attempt + 1,
                    "fail_slow_job_clock": job_clock_windows(load_events(run), slow)}
    raise RuntimeError(f"job did not finish within {cfg.max_attempts} attempts (mtbf_s={cfg.mtbf_s} too short?)")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="run one fault-injected harness job")
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, default=HarnessConfig.steps)
    p.add_argument("--checkpoint-every", type=int, default=HarnessConfig.checkpoint_every)
    p.add_argument("--mtbf", type=float, default=0.0)
    p.add_argument("--restart", choices=("cold", "warm"), default=HarnessConfig.restart)
    args = p.parse_args()
    print(json.dumps(run_job(HarnessConfig(steps=args.steps, checkpoint_every=args.checkpoint_every,
                                           mtbf_s=args.mtbf, restart=args.restart), args.run_dir), indent=1))

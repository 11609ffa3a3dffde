"""The worker of the TOR harness: a small GPT-2 trained on real text with ``common.train``.

Launched (and relaunched after every injected fail-stop) by ``supervisor.py``. It appends one JSON line
per event to ``<run_dir>/trainer_events.jsonl``: ``train_begin`` (model built, checkpoint loaded),
``step_end``, ``checkpoint_begin``/``checkpoint_end``, ``train_end``. Fail-slow faults are injected
here: during a slow window from ``<run_dir>/slow_schedule.json`` each step is stretched by sleeping
``(1/rho - 1)`` times its own compute time, so the step rate is exactly ``rho`` of healthy. Windows are
on the training clock: the uptime of earlier attempts (``TOR_TRAIN_CLOCK`` from the supervisor) plus the
time since this attempt's ``train_begin``.

    python -m exp_tor.harness.trainer RUN_DIR   # reads RUN_DIR/harness_config.json

``run_attempt`` is the entry point of a warm restart: the supervisor forks it from a forkserver that has
already imported this module, transformers' GPT-2 and accelerate (see ``supervisor.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.data import load_text
from common.models import build_causal_lm
from common.train import TrainConfig, train


class EventLog:
    """Append-only JSONL; each line is flushed at once so a SIGKILL loses nothing already logged."""

    def __init__(self, path: Path, attempt: int) -> None:
        self.f = open(path, "a", buffering=1, encoding="utf-8")
        self.attempt = attempt

    def __call__(self, event: str, **info) -> None:
        info.setdefault("time", time.time())
        self.f.write(json.dumps({"event": event, "attempt": self.attempt, "pid": os.getpid(), **info}) + "\n")
        self.f.flush()


def byte_dataset(text: str, seq_len: int, n_seqs: int) -> list[dict]:
    """Non-overlapping byte-level sequences (vocab 256): no tokenizer to train, same data on every attempt."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")[: seq_len * n_seqs]), dtype=torch.uint8).long()
    rows = data.view(-1, seq_len)
    return [{"input_ids": r, "labels": r} for r in rows]


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def weights_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(run_dir: str, attempt: int | None = None, job_start: float | None = None,
         train_clock: float | None = None) -> None:
    """One attempt. ``job_start`` is no longer read (the fail-slow windows are on the training clock,
    ``train_clock`` = the earlier attempts' uptime); it stays in the signature the supervisor calls."""
    run = Path(run_dir)
    cfg = json.loads((run / "harness_config.json").read_text())
    attempt = int(os.environ.get("TOR_ATTEMPT", "0")) if attempt is None else attempt
    log = EventLog(run / "trainer_events.jsonl", attempt)
    torch.set_num_threads(int(cfg.get("threads", 1)))  # steady step times: no oversubscription
    torch.manual_seed(cfg["seed"])
    model = build_causal_lm("gpt2", vocab_size=256, d_model=cfg["d_model"], n_layers=cfg["n_layers"],
                            n_heads=cfg["n_heads"], max_seq_len=cfg["seq_len"], dropout=0.1)
    text = load_text(cfg["corpus"])["text"][0]
    dataset = byte_dataset(text, cfg["seq_len"], cfg["n_seqs"])
    schedule = json.loads((run / "slow_schedule.json").read_text()) if (run / "slow_schedule.json").exists() else []
    if train_clock is None:   # training time of the earlier attempts (the fail-slow windows' clock)
        train_clock = float(os.environ.get("TOR_TRAIN_CLOCK", "0"))
    extra_save_delay = float(cfg.get("extra_checkpoint_delay_s", 0.0))
    state = {"last": None, "recent": [], "first": True, "begin": None}

    def on_event(event: str, info: dict) -> None:
        if event in ("train_begin", "resume"):
            state["last"] = time.time()
        if event == "step_end":
            now = time.time()
            compute = now - (state["last"] or now)
            t_train = train_clock + (now - (state["begin"] or now))   # the training clock, not the job clock
            slow = next((w for w in schedule if w["start"] <= t_train < w["start"] + w["duration"]), None)
            if slow is not None:  # fail-slow: this step runs at rho of the healthy rate
                # healthy step time = median of recent steps (the first step after a (re)start is not typical)
                typical = statistics.median(state["recent"]) if state["recent"] else compute
                time.sleep(typical * (1.0 / slow["rho"] - 1.0))
            elif not state["first"]:
                state["recent"] = (state["recent"] + [compute])[-20:]
            state["first"] = False
            log("step_end", step=info["step"], loss=info["loss"], slow=slow is not None)
            state["last"] = time.time()
        elif event == "checkpoint_begin":
            log("checkpoint_begin", step=info["step"])
            if extra_save_delay:  # emulates slower checkpoint storage (a documented knob, default 0)
                time.sleep(extra_save_delay)
        elif event == "checkpoint_end":
            log("checkpoint_end", step=info["step"])
            state["last"] = time.time()
        elif event == "train_begin":
            state["begin"] = time.time()   # the training clock runs from here (analyze's uptime too)
            log("train_begin", step=info["step"], time=state["begin"], train_clock=train_clock)

    tcfg = TrainConfig(max_steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"], warmup_steps=10,
                       checkpoint_every=cfg["checkpoint_every"], keep_checkpoints=2, log_every=10**9,
                       seed=cfg["seed"], cpu=True, log_with="none")  # no tracker: it would add to the overhead measured
    res = train(model, dataset, tcfg, run / "checkpoints", collate_fn=collate, callbacks=[on_event])
    log("train_end", step=res.step, loss=res.final_loss, weights_sha256=weights_sha256(model))


def run_attempt(run_dir: str, attempt: int, job_start: float, log_path: str, train_clock: float = 0.0) -> None:
    """A warm-restarted attempt: output to the attempt's log file, then ``main``."""
    from exp_tor.harness.supervisor import without_launch_env

    # the forkserver inherited the supervisor's environment: under a multi-process launch, drop its rank
    # variables so that this trainer's Accelerator is a single process (a cold attempt gets them dropped too)
    kept = without_launch_env(dict(os.environ))
    for k in set(os.environ) - set(kept):
        del os.environ[k]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    # tqdm's default lock is a multiprocessing semaphore, which a SIGKILL would leak; one process needs none
    tqdm.set_lock(threading.RLock())
    main(run_dir, attempt, job_start, train_clock)


if __name__ == "__main__":
    main(sys.argv[1])

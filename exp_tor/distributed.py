"""Independent jobs shared out over the processes of a multi-process launch, and progress lines per job.

Under ``accelerate launch --num_processes W`` every process runs each stage function (``common.stages``).
exp_tor's work is lists of independent jobs (Monte Carlo grid cells, harness training jobs), so process
``rank`` runs jobs ``rank, rank + W, ...`` and the results are gathered to every process
(``accelerate.utils.gather_object``: ``torch.distributed.all_gather_object`` under the launch's process
group); the main process alone logs rows and writes files (``StageContext``). One process: a plain loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

J = TypeVar("J")
R = TypeVar("R")


def world_of(ctx: Any) -> tuple[int, int]:
    """(rank, world size) of a ``StageContext``; anything else (a plain ``Run``) is one process."""
    return int(getattr(ctx, "rank", 0)), int(getattr(ctx, "world_size", 1))


def my_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The job indices of process ``rank``: every ``world_size``-th from ``rank`` (``StageContext.shard``)."""
    return list(range(rank, n, world_size))


def gather_in_order(local: list[tuple[int, Any]], n: int, world_size: int) -> list[Any]:
    """Every process's ``(index, result)`` pairs -> all ``n`` results in job order, on every process."""
    pairs = local
    if world_size > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(local)   # a list per process, concatenated in rank order
    by_index = dict(pairs)
    missing = sorted(set(range(n)) - set(by_index))
    if missing or len(pairs) != n:
        raise RuntimeError(f"gathered {len(pairs)} results for {n} jobs (missing {missing[:5]}): "
                           "a process ran a different job list")
    return [by_index[i] for i in range(n)]


class JobProgress:
    """One line per finished job: ``[label] job i/n name: s s (rank r), elapsed, ETA``.

    The ETA is the mean wall time per finished job so far (wall clock since the first job, so jobs run in
    parallel count once) times the jobs left. Thread-safe: jobs of a thread pool report as they finish."""

    def __init__(self, label: str, n: int, rank: int = 0, world_size: int = 1,
                 printer: Callable[[str], None] | None = None) -> None:
        self.label, self.n, self.done = label, n, 0
        self.tag = f" (rank {rank}/{world_size})" if world_size > 1 else ""
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._print = printer or (lambda s: print(s, flush=True))

    def start(self, name: str) -> None:
        self._print(f"[{self.label}] job {self.done + 1}/{self.n} {name}: started{self.tag}")

    def finish(self, name: str, seconds: float) -> str:
        with self._lock:
            self.done += 1
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / self.done * (self.n - self.done)
            line = (f"[{self.label}] job {self.done}/{self.n} {name}: done in {seconds:.1f} s{self.tag}; "
                    f"elapsed {_fmt(elapsed)}, ETA {_fmt(eta)}")
            self._print(line)
            return line


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def run_shared(ctx: Any, jobs: Sequence[J], fn: Callable[[J], R], names: Sequence[str] | None = None,
               label: str = "exp_tor", parallel: int = 1, first_alone: bool = False,
               progress: bool = True) -> list[R]:
    """``fn(job)`` for every job, shared out over the launch's processes; results in job order everywhere.

    ``parallel`` jobs of a process run at once (threads: each job is a subprocess or releases the GIL).
    ``first_alone``: job 0 runs before, not next to, this process's other jobs (the harness's validation
    job, whose timings are the measurement). ``progress`` prints a line per finished job with an ETA."""
    rank, world = world_of(ctx)
    mine = my_indices(len(jobs), rank, world)
    names = [str(i) for i in range(len(jobs))] if names is None else list(names)
    prog = JobProgress(label, len(mine), rank, world) if progress else None
    if world > 1:   # says the work is split (and how), once per process
        print(f"[{label}] rank {rank}/{world}: {len(mine)} of {len(jobs)} jobs", flush=True)

    def one(i: int) -> tuple[int, R]:
        t = time.perf_counter()
        if prog is not None and parallel > 1:
            prog.start(names[i])
        out = fn(jobs[i])
        if prog is not None:
            prog.finish(names[i], time.perf_counter() - t)
        return i, out

    local: list[tuple[int, Any]] = []
    rest = mine
    if first_alone and mine and mine[0] == 0:
        local.append(one(0))
        rest = mine[1:]
    if parallel > 1 and len(rest) > 1:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            local += list(pool.map(one, rest))
    else:
        local += [one(i) for i in rest]
    return gather_in_order(local, len(jobs), world)

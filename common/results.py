"""The shared results table.

Every result is one JSON record file ``results/runs/<experiment>/<record_id>.json`` written atomically
(temp file in the same directory + fsync + ``os.replace``), so concurrent writers never collide (unique
names) and a crash mid-write leaves at most a stray ``*.tmp`` that readers ignore. ``results/results.csv``
is regenerated deterministically from all records (sorted, fixed columns) under a file lock.

    run = Run("exp_tor", config=cfg, seed=cfg.seed)          # captures git commit, device, versions
    run.log(table="fig_tor_vs_interval", method="young", metric="tor", value=0.93,
            stderr=0.01, n=1000, params={"mtbf_h": 3.1, "interval_min": 30})
    run.finish()                                              # regenerates results.csv

Under accelerate/torchrun only the main process (RANK 0) writes; other ranks' ``log`` calls are no-ops.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from common.paths import REPO_ROOT
from common.paths import results_dir as _results_root

CSV_COLUMNS = [
    "experiment", "table", "method", "metric", "value", "stderr", "n", "params", "seed",
    "git_commit", "git_dirty", "device", "run_id", "record_id", "profile", "start_time", "end_time",
]
REQUIRED_KEYS = ["experiment", "table", "method", "metric", "value", "config", "seed", "git", "device",
                 "versions", "run_id", "record_id", "start_time", "end_time"]
TRACKED_LIBRARIES = ["torch", "triton", "transformers", "accelerate", "datasets", "peft", "lm_eval",
                     "numpy", "pandas"]


class CorruptRecordError(ValueError):
    """A record file cannot be parsed or lacks required keys; the message names the file."""


def results_dir() -> Path:
    return _results_root()


def is_main_process() -> bool:
    """RANK 0 (or no distributed launch at all)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # torch missing or not initialised: fall back to the launcher's env
        pass
    return int(os.environ.get("RANK", "0")) == 0


def git_info(repo: Path = REPO_ROOT) -> dict:
    """Commit hash and whether tracked files differ from it (``results/`` excluded: runs write there)."""
    def _git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    try:
        commit = _git("rev-parse", "HEAD") or "unknown"
        status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
        return {"commit": commit, "dirty": bool(status)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": True}


def device_name() -> str:
    """GPU name when CUDA is in use, else the CPU model and core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU: {model} x{os.cpu_count()}"


def library_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(x: Any) -> Any:
    if is_dataclass(x) and not isinstance(x, type):
        from common.config import to_dict

        return to_dict(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return x.item()
    return x


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Run:
    """One invocation of an experiment; every ``log`` call becomes one record file."""

    experiment: str
    config: Any = None
    seed: int | None = None
    profile: str | None = None
    root: Path | None = None
    run_id: str = field(default_factory=lambda: _dt.datetime.now().strftime("%Y%m%d-%H%M%S-")
                        + uuid.uuid4().hex[:8])
    start_time: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        self.root = Path(self.root) if self.root else results_dir()
        self._count = 0
        self._meta: dict | None = None

    def _metadata(self) -> dict:
        if self._meta is None:  # computed once per run: git/device/versions do not change mid-run
            self._meta = {"config": _jsonable(self.config), "git": git_info(), "device": device_name(),
                          "versions": library_versions(), "argv": sys.argv}
        return self._meta

    def log(self, table: str, method: str, metric: str, value: float, stderr: float | None = None,
            n: int | None = None, params: dict | None = None, seed: int | None = None,
            device: str | None = None, extra: dict | None = None) -> Path | None:
        """Write one result record atomically. Returns its path (None on non-main ranks)."""
        if not is_main_process():
            return None
        if not (isinstance(value, (int, float)) or hasattr(value, "item")):
            raise TypeError(f"value for {table}/{method}/{metric} must be a number, got {type(value).__name__}")
        self._count += 1
        meta = self._metadata()
        record_id = f"{self.run_id}-{self._count:05d}"
        rec = {
            "experiment": self.experiment, "table": table, "method": method, "metric": metric,
            "value": _finite_or_none(_jsonable(value)), "stderr": _finite_or_none(_jsonable(stderr)),
            "n": None if n is None else int(n), "params": _jsonable(params or {}),
            "seed": self.seed if seed is None else seed, "profile": self.profile,
            "config": meta["config"], "git": meta["git"], "device": device or meta["device"],
            "versions": meta["versions"], "argv": meta["argv"], "run_id": self.run_id,
            "record_id": record_id, "start_time": self.start_time, "end_time": _now(),
            "extra": _jsonable(extra or {}),
        }
        path = self.root / "runs" / self.experiment / f"{record_id}.json"
        atomic_write_text(path, json.dumps(rec, indent=1, sort_keys=True, allow_nan=False))
        return path

    def finish(self) -> Path | None:
        """Regenerate ``results.csv`` from every record (main process only)."""
        if not is_main_process():
            return None
        return regenerate_csv(self.root)


def iter_records(root: Path | None = None) -> Iterator[tuple[Path, dict]]:
    """Every record under ``root/runs``, sorted by path. Raises CorruptRecordError naming a bad file."""
    root = Path(root) if root else results_dir()
    for path in sorted((root / "runs").glob("*/*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptRecordError(f"corrupt result record {path}: {exc}") from None
        if not isinstance(rec, dict):
            raise CorruptRecordError(f"corrupt result record {path}: top level is not an object")
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            raise CorruptRecordError(f"corrupt result record {path}: missing keys {missing}")
        yield path, rec


def _row(rec: dict) -> dict:
    return {
        "experiment": rec["experiment"], "table": rec["table"], "method": rec["method"],
        "metric": rec["metric"], "value": rec["value"], "stderr": rec.get("stderr"), "n": rec.get("n"),
        "params": json.dumps(rec.get("params") or {}, sort_keys=True), "seed": rec["seed"],
        "git_commit": rec["git"].get("commit"), "git_dirty": rec["git"].get("dirty"),
        "device": rec["device"], "run_id": rec["run_id"], "record_id": rec["record_id"],
        "profile": rec.get("profile"), "start_time": rec["start_time"], "end_time": rec["end_time"],
    }


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def regenerate_csv(root: Path | None = None) -> Path:
    """Rebuild ``results.csv`` from all records: sorted, fixed columns, byte-identical for equal inputs."""
    import csv
    import io

    root = Path(root) if root else results_dir()
    with _locked(root):
        rows = [_row(rec) for _, rec in iter_records(root)]
        rows.sort(key=lambda r: (r["experiment"], r["table"], r["method"], r["metric"], r["record_id"]))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
        out = root / "results.csv"
        atomic_write_text(out, buf.getvalue())
    return out


def load_results(root: Path | None = None, expand_params: bool = True, from_records: bool = False):
    """The results table as a pandas DataFrame (``params`` expanded into ``p.<key>`` columns).

    Reads ``results.csv`` (regenerating it if missing) or, with ``from_records``, the record files.
    """
    import pandas as pd

    root = Path(root) if root else results_dir()
    csv_path = root / "results.csv"
    if from_records or not csv_path.exists():
        rows = [_row(rec) for _, rec in iter_records(root)]
        df = pd.DataFrame(rows, columns=CSV_COLUMNS)
    else:
        df = pd.read_csv(csv_path, dtype={"params": str, "git_commit": str, "run_id": str, "record_id": str})
    if expand_params and len(df):
        params = df["params"].fillna("{}").map(json.loads)
        keys = sorted({k for p in params for k in p})
        for k in keys:
            df[f"p.{k}"] = params.map(lambda p, k=k: p.get(k))
    return df


def latest_rows(df):
    """Drop rows superseded by a later run: one row per (experiment, table, method, metric, params, seed),
    the one with the newest ``start_time``. Re-running an experiment therefore replaces its rows in the
    figures, while rows from separate runs that differ in params or seed are all kept."""
    if df.empty:
        return df
    key = ["experiment", "table", "method", "metric", "params", "seed"]
    order = df.sort_values(["start_time", "record_id"], kind="stable")
    return order.drop_duplicates(subset=key, keep="last").sort_index()

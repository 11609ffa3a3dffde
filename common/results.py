"""The shared results table.

A run (one ``Run`` object: one invocation of an experiment) writes one folder

    results/runs/<experiment>/<run_id>/
        manifest.json    provenance, written once: experiment, run_id, profile, config, seed,
                         git {commit, dirty}, device, library versions, argv (repo-relative),
                         start_time, end_time, plus free fields (``Run.update_manifest``)
        rows.jsonl       one compact JSON object per row: table, method, metric, value, stderr, n,
                         params, record_id, end_time, extra, and seed/device only where they differ
        committed.json   {"rows": N, "bytes": B}: the first B bytes of rows.jsonl hold its N rows

Why this is safe:

* The folder appears by renaming a finished temp folder (manifest + an empty commit), so a visible run
  folder always has its manifest.
* ``log`` writes its line at the committed end of ``rows.jsonl`` (pwrite + fsync) and only then replaces
  ``committed.json`` (temp file + rename). A writer killed at any point leaves bytes past the commit at
  most, and readers never look past it: a killed writer leaves no partial row visible, and every row
  whose ``log`` returned is visible. O(1) work per row, whatever the run's size.
* A ``rows.jsonl`` shorter than its commit (truncated), a committed line that is not a JSON object, or a
  record field of the wrong type (``"git": "abc"``, ``"value": "oops"``) raises ``CorruptRecordError``
  naming the file (and line). ``log`` checks the same types before writing.
* Every run has its own folder (run ids carry a random part), so concurrent runs never share a file.

``results/results.csv`` is regenerated deterministically from all runs (sorted, fixed columns) under a
file lock. ``iter_records`` rebuilds the full per-row dicts (manifest fields + row fields), so callers see
the same records as when every row was its own file (``scripts/migrate_records.py`` converts that older
layout).

    run = Run("exp_tor", config=cfg, seed=cfg.seed)          # captures git commit, device, versions
    run.log(table="fig_tor_vs_interval", method="young", metric="tor", value=0.93,
            stderr=0.01, n=1000, params={"mtbf_h": 3.1, "interval_min": 30})
    run.update_manifest(stages={"train": {"seconds": 12.5}})  # free provenance fields, merged
    run.finish()                                              # end_time; regenerates results.csv

Under accelerate/torchrun only the main process (RANK 0) writes; other ranks' calls are no-ops. A run
that logs no row leaves no folder.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import fcntl
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from common.paths import REPO_ROOT, relative_argv
from common.paths import results_dir as _results_root

CSV_COLUMNS = [
    "experiment", "table", "method", "metric", "value", "stderr", "n", "params", "seed",
    "git_commit", "git_dirty", "device", "run_id", "record_id", "profile", "start_time", "end_time",
]
REQUIRED_KEYS = ["experiment", "table", "method", "metric", "value", "config", "seed", "git", "device",
                 "versions", "run_id", "record_id", "start_time", "end_time"]
TRACKED_LIBRARIES = ["torch", "triton", "transformers", "accelerate", "datasets", "peft", "lm_eval",
                     "numpy", "pandas"]

FORMAT = 1
MANIFEST = "manifest.json"
ROWS = "rows.jsonl"
COMMITTED = "committed.json"
# A record = the run's fields (manifest) + the row's fields. A row may also carry any run field but the
# two that name its folder, where its value differs from the manifest's (seed, device; after a
# migration possibly config, argv, ...), so no per-record provenance is ever dropped.
RUN_FIELDS = ("experiment", "run_id", "profile", "config", "seed", "git", "device", "versions", "argv",
              "start_time")
ROW_FIELDS = ("table", "method", "metric", "value", "stderr", "n", "params", "record_id", "end_time", "extra")
ROW_OVERRIDES = tuple(k for k in RUN_FIELDS if k not in ("experiment", "run_id"))
ROW_DEFAULTS = {"stderr": None, "n": None, "params": {}, "extra": {}}
RECORD_KEYS = (*RUN_FIELDS, *ROW_FIELDS)
MANIFEST_RESERVED = (*RUN_FIELDS, "format", "end_time")


class CorruptRecordError(ValueError):
    """A record file cannot be parsed, is truncated, or holds a field of the wrong type; the message names
    the file (and line)."""


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


def jsonable(x: Any) -> Any:
    """A JSON-able copy of ``x``: dataclass configs as dicts, paths as strings, numpy/torch scalars as numbers."""
    if is_dataclass(x) and not isinstance(x, type):
        from common.config import to_dict

        return to_dict(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return x.item()
    return x


def atomic_write_text(path: Path, text: str, fsync: bool = True) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make the table unreadable to other users
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
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


# ------------------------------------------------------------------------------------ field types
def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_CHECKS: dict[str, tuple[Any, str]] = {
    "experiment": (lambda x: isinstance(x, str) and bool(x), "a non-empty string"),
    "run_id": (lambda x: isinstance(x, str) and bool(x), "a non-empty string"),
    "record_id": (lambda x: isinstance(x, str) and bool(x), "a non-empty string"),
    "table": (lambda x: isinstance(x, str), "a string"),
    "method": (lambda x: isinstance(x, str), "a string"),
    "metric": (lambda x: isinstance(x, str), "a string"),
    "value": (lambda x: x is None or _is_num(x), "a finite number or null"),
    "stderr": (lambda x: x is None or _is_num(x), "a finite number or null"),
    "n": (lambda x: x is None or _is_int(x), "an integer or null"),
    "params": (lambda x: isinstance(x, dict), "an object"),
    "extra": (lambda x: isinstance(x, dict), "an object"),
    "seed": (lambda x: x is None or _is_int(x), "an integer or null"),
    "profile": (lambda x: x is None or isinstance(x, str), "a string or null"),
    "config": (lambda x: x is None or isinstance(x, dict), "an object or null"),
    "git": (lambda x: isinstance(x, dict) and isinstance(x.get("commit"), str)
            and isinstance(x.get("dirty"), bool), 'an object {"commit": string, "dirty": bool}'),
    "device": (lambda x: isinstance(x, str), "a string"),
    "versions": (lambda x: isinstance(x, dict) and all(isinstance(v, str) for v in x.values()),
                 "an object of version strings"),
    "argv": (lambda x: isinstance(x, list) and all(isinstance(a, str) for a in x), "a list of strings"),
    "start_time": (lambda x: isinstance(x, str), "a string"),
    "end_time": (lambda x: isinstance(x, str), "a string"),
}


def field_problems(obj: dict, keys: Iterable[str]) -> list[str]:
    """For each of ``keys`` present in ``obj`` whose value has the wrong type: a line saying so."""
    out = []
    for k in keys:
        if k in obj:
            ok, want = _CHECKS[k]
            if not ok(obj[k]):
                out.append(f"field '{k}' must be {want}, got {type(obj[k]).__name__} {_short(obj[k])}")
    return out


def _short(x: Any) -> str:
    s = json.dumps(x, default=repr) if not isinstance(x, str) else repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def validate_record(rec: dict, where: str = "record") -> None:
    """Raise CorruptRecordError (naming ``where``) unless ``rec`` is a full record with the right types."""
    if not isinstance(rec, dict):
        raise CorruptRecordError(f"corrupt result record {where}: not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise CorruptRecordError(f"corrupt result record {where}: missing keys {missing}")
    problems = field_problems(rec, RECORD_KEYS)
    if problems:
        raise CorruptRecordError(f"corrupt result record {where}: " + "; ".join(problems))


def _loads(text: str) -> Any:
    """json.loads that refuses NaN/Infinity (the writer never emits them)."""
    def bad(token: str) -> Any:
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(text, parse_constant=bad)


def _dump_row(row: dict) -> bytes:
    return (json.dumps(row, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def _dump_manifest(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n"


def _merge(dst: dict, src: dict) -> None:
    """Recursive dict update: nested dicts merge, anything else replaces."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


# ---------------------------------------------------------------------------------------- writer
def _check_experiment_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"experiment name must be a plain folder name, got {name!r}")


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _publish_run_dir(run_dir: Path, manifest: dict, data: bytes = b"", n_rows: int = 0) -> None:
    """Create ``run_dir`` with its manifest, rows and commit, appearing at once (temp folder + rename)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700, as for files
        atomic_write_text(tmp / MANIFEST, _dump_manifest(manifest))
        if data:
            with open(tmp / ROWS, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        atomic_write_text(tmp / COMMITTED, json.dumps({"rows": n_rows, "bytes": len(data)}))
        os.rename(tmp, run_dir)  # refuses an existing (non-empty) folder: never overwritten
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_run_dir(run_dir: Path, manifest: dict, rows: list[dict]) -> None:
    """Write a complete run folder at once (used by ``scripts/migrate_records.py``).

    ``manifest`` holds every run field (``RUN_FIELDS``) and any free fields; each row the row fields
    (``ROW_FIELDS``; stderr, n, params, extra optional) plus any run field whose value differs from the
    manifest's. Types are checked as on read; a wrong one raises TypeError.
    """
    run_dir = Path(run_dir)
    missing = [k for k in RUN_FIELDS if k not in manifest]
    problems = ([f"missing fields {missing}"] if missing else []) + field_problems(manifest, RUN_FIELDS)
    if problems:
        raise TypeError(f"run {run_dir.name}: " + "; ".join(problems))
    for i, r in enumerate(rows, 1):
        _check_row(r, f"run {run_dir.name} row {i}", TypeError)
    _publish_run_dir(run_dir, {**manifest, "format": FORMAT}, b"".join(_dump_row(r) for r in rows), len(rows))


def _check_row(row: dict, where: str, exc: type[Exception]) -> None:
    unknown = sorted(set(row) - set(ROW_FIELDS) - set(ROW_OVERRIDES))
    missing = [k for k in ("table", "method", "metric", "value", "record_id", "end_time") if k not in row]
    problems = ([f"unknown fields {unknown}"] if unknown else []) + (
        [f"missing fields {missing}"] if missing else []) + field_problems(row, (*ROW_FIELDS, *ROW_OVERRIDES))
    if problems:
        raise exc(f"{where}: " + "; ".join(problems))


@dataclass
class Run:
    """One invocation of an experiment: one manifest, and one line of ``rows.jsonl`` per ``log`` call."""

    experiment: str
    config: Any = None
    seed: int | None = None
    profile: str | None = None
    root: Path | None = None
    run_id: str = field(default_factory=lambda: _dt.datetime.now().strftime("%Y%m%d-%H%M%S-")
                        + uuid.uuid4().hex[:8])
    start_time: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        _check_experiment_name(self.experiment)
        self.root = Path(self.root) if self.root else results_dir()
        self._count = 0
        self._bytes = 0
        self._manifest: dict | None = None
        self._pending: dict = {}  # update_manifest fields given before the folder exists
        self._created = False
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / "runs" / self.experiment / self.run_id

    def _build_manifest(self) -> dict:
        seed = jsonable(self.seed)
        m = {"format": FORMAT, "experiment": self.experiment, "run_id": self.run_id, "profile": self.profile,
             "config": jsonable(self.config), "seed": seed, "git": git_info(), "device": device_name(),
             "versions": library_versions(), "argv": relative_argv([str(a) for a in sys.argv]),
             "start_time": self.start_time, "end_time": None}
        problems = field_problems(m, RUN_FIELDS)
        if problems:
            raise TypeError(f"run {self.experiment}/{self.run_id}: " + "; ".join(problems))
        _merge(m, self._pending)
        return m

    def _ensure_dir(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("a Run is written by the process that created it: create one Run per process")
        if not self._created:  # git/device/versions computed once per run: they do not change mid-run
            self._manifest = self._build_manifest()
            _publish_run_dir(self.run_dir, self._manifest)
            self._created = True

    def log(self, table: str, method: str, metric: str, value: float, stderr: float | None = None,
            n: int | None = None, params: dict | None = None, seed: int | None = None,
            device: str | None = None, extra: dict | None = None) -> Path | None:
        """Append one result row, visible once this returns. Returns the run's ``rows.jsonl`` (None on
        non-main ranks)."""
        if not is_main_process():
            return None
        if not (isinstance(value, (int, float)) or hasattr(value, "item")):
            raise TypeError(f"value for {table}/{method}/{metric} must be a number, got {type(value).__name__}")
        row: dict[str, Any] = {"table": table, "method": method, "metric": metric,
                               "value": _finite_or_none(jsonable(value))}
        if stderr is not None:
            row["stderr"] = _finite_or_none(jsonable(stderr))
        if n is not None:
            row["n"] = int(n)
        if params:
            row["params"] = jsonable(params)
        if extra:
            row["extra"] = jsonable(extra)
        with self._lock:
            self._ensure_dir()
            assert self._manifest is not None
            if seed is not None and jsonable(seed) != self._manifest["seed"]:
                row["seed"] = jsonable(seed)
            if device and device != self._manifest["device"]:
                row["device"] = device
            row["record_id"] = f"{self.run_id}-{self._count + 1:05d}"
            row["end_time"] = _now()
            _check_row(row, f"{table}/{method}/{metric}", TypeError)
            line = _dump_row(row)
            rows = self.run_dir / ROWS
            fd = os.open(rows, os.O_WRONLY | os.O_CREAT, 0o644)
            try:  # at the committed end: bytes a failed earlier write left past it are overwritten
                _pwrite_all(fd, line, self._bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            # the row becomes visible here, at once; the rows file is already on disk, so no fsync
            atomic_write_text(self.run_dir / COMMITTED,
                              json.dumps({"rows": self._count + 1, "bytes": self._bytes + len(line)}),
                              fsync=False)
            self._count += 1
            self._bytes += len(line)
        return rows

    def update_manifest(self, **fields: Any) -> Path | None:
        """Merge JSON-able free fields (e.g. per-stage wall times) into the manifest, rewritten atomically.
        Nested dicts merge key by key. Provenance fields (config, git, ...) cannot be changed. Before the
        run's first row the fields are kept and written with it (a run without rows writes nothing)."""
        if not is_main_process():
            return None
        reserved = sorted(set(fields) & set(MANIFEST_RESERVED))
        if reserved:
            raise ValueError(f"update_manifest cannot set provenance fields {reserved}")
        fields = jsonable(fields)
        json.dumps(fields, allow_nan=False)  # not JSON-able: fail here, not in a later rewrite
        with self._lock:
            if not self._created:
                _merge(self._pending, copy.deepcopy(fields))
                return None
            assert self._manifest is not None
            _merge(self._manifest, fields)
            atomic_write_text(self.run_dir / MANIFEST, _dump_manifest(self._manifest))
        return self.run_dir / MANIFEST

    def finish(self) -> Path | None:
        """Set the manifest's end_time and regenerate ``results.csv`` from every run (main process only)."""
        if not is_main_process():
            return None
        with self._lock:
            if self._created and self._manifest is not None and os.getpid() == self._pid:
                self._manifest["end_time"] = _now()
                atomic_write_text(self.run_dir / MANIFEST, _dump_manifest(self._manifest))
        return regenerate_csv(self.root)


# ---------------------------------------------------------------------------------------- reader
def _corrupt(path: Path, msg: str) -> CorruptRecordError:
    return CorruptRecordError(f"corrupt result record {path}: {msg}")


def _read_json(path: Path) -> Any:
    try:
        return _loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _corrupt(path, "file missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(path, str(exc)) from None


def read_manifest(run_dir: Path) -> dict:
    """A run folder's manifest, type-checked; CorruptRecordError names the file."""
    path = Path(run_dir) / MANIFEST
    m = _read_json(path)
    if not isinstance(m, dict):
        raise _corrupt(path, "top level is not an object")
    if m.get("format") != FORMAT:
        raise _corrupt(path, f"unknown format {m.get('format')!r} (this code reads format {FORMAT})")
    missing = [k for k in RUN_FIELDS if k not in m]
    problems = ([f"missing keys {missing}"] if missing else []) + field_problems(m, RUN_FIELDS)
    if m.get("end_time") is not None and not isinstance(m["end_time"], str):
        problems.append("field 'end_time' must be a string or null")
    if not problems and (m["run_id"] != path.parent.name or m["experiment"] != path.parent.parent.name):
        problems.append(f"experiment/run_id {m['experiment']}/{m['run_id']} do not match its folder")
    if problems:
        raise _corrupt(path, "; ".join(problems))
    return m


def _record(row: dict, run_json: str) -> dict:
    rec = _loads(run_json)  # a fresh copy of the run fields per record: callers may mutate theirs
    rec.update(copy.deepcopy(ROW_DEFAULTS))
    rec.update(row)
    return rec


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """A run folder's manifest and its committed rows as full records (run fields + row fields).

    Bytes past the commit (a writer killed mid-``log``) are ignored; a rows file shorter than its commit,
    a committed line that does not parse, or a field of the wrong type raises CorruptRecordError naming
    the file and line.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    cpath, rpath = run_dir / COMMITTED, run_dir / ROWS
    commit = _read_json(cpath)  # the commit first, then the rows: a concurrent log only adds past it
    if not (isinstance(commit, dict) and _is_int(commit.get("rows")) and _is_int(commit.get("bytes"))
            and commit["rows"] >= 0 and commit["bytes"] >= 0):
        raise _corrupt(cpath, 'expected {"rows": int, "bytes": int}')
    if commit["bytes"] == 0:
        data = b""
    else:
        try:
            with open(rpath, "rb") as f:
                data = f.read(commit["bytes"])
        except FileNotFoundError:
            raise _corrupt(rpath, f"file missing; {cpath.name} records {commit['rows']} rows") from None
    if len(data) < commit["bytes"] or (data and not data.endswith(b"\n")):
        raise _corrupt(rpath, f"truncated: {len(data)} bytes, but {cpath.name} records {commit['bytes']} "
                              f"bytes ({commit['rows']} rows)")
    lines = data.split(b"\n")[:-1] if data else []
    if len(lines) != commit["rows"]:
        raise _corrupt(rpath, f"{len(lines)} lines, but {cpath.name} records {commit['rows']} rows")
    run_json = json.dumps({k: manifest[k] for k in RUN_FIELDS})
    records, seen = [], set()
    for i, raw in enumerate(lines, 1):
        where = f"{rpath}:{i}"
        try:
            row = _loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptRecordError(f"corrupt result record {where}: {exc}") from None
        if not isinstance(row, dict):
            raise CorruptRecordError(f"corrupt result record {where}: not a JSON object")
        _check_row(row, f"corrupt result record {where}", CorruptRecordError)
        if row["record_id"] in seen:
            raise CorruptRecordError(f"corrupt result record {where}: duplicate record_id {row['record_id']}")
        seen.add(row["record_id"])
        records.append(_record(row, run_json))
    return manifest, records


def old_format_files(root: Path | None = None) -> list[Path]:
    """Record files of the earlier one-file-per-row layout (``runs/<experiment>/<record_id>.json``)."""
    root = Path(root) if root else results_dir()
    return sorted(p for p in (root / "runs").glob("*/*.json") if not p.name.startswith("."))


def run_dirs(root: Path | None = None) -> list[Path]:
    """Every visible run folder under ``root/runs``, sorted (temp folders start with a dot)."""
    root = Path(root) if root else results_dir()
    return sorted(p for p in (root / "runs").glob("*/*")
                  if p.is_dir() and not p.name.startswith(".") and not p.parent.name.startswith("."))


def iter_records(root: Path | None = None) -> Iterator[tuple[Path, dict]]:
    """Every committed record under ``root/runs`` as (its run's rows.jsonl, full record dict), sorted by
    run folder then row. Raises CorruptRecordError naming a bad file."""
    root = Path(root) if root else results_dir()
    old = old_format_files(root)
    if old:
        raise CorruptRecordError(f"{len(old)} record file(s) of the old one-file-per-row layout, e.g. {old[0]}: "
                                 "convert them with `python scripts/migrate_records.py`")
    for d in run_dirs(root):
        _, records = read_run(d)
        for rec in records:
            yield d / ROWS, rec


def _row(rec: dict) -> dict:
    return {
        "experiment": rec["experiment"], "table": rec["table"], "method": rec["method"],
        "metric": rec["metric"], "value": rec["value"], "stderr": rec.get("stderr"), "n": rec.get("n"),
        "params": json.dumps(rec.get("params") or {}, sort_keys=True), "seed": rec["seed"],
        "git_commit": rec["git"].get("commit"), "git_dirty": rec["git"].get("dirty"),
        "device": rec["device"], "run_id": rec["run_id"], "record_id": rec["record_id"],
        "profile": rec.get("profile"), "start_time": rec["start_time"], "end_time": rec["end_time"],
    }


def csv_text(records: Iterable[dict]) -> str:
    """The results.csv text for full records: sorted, fixed columns, byte-identical for equal inputs."""
    import csv
    import io

    rows = [_row(rec) for rec in records]
    rows.sort(key=lambda r: (r["experiment"], r["table"], r["method"], r["metric"], r["record_id"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


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
    root = Path(root) if root else results_dir()
    with _locked(root):
        text = csv_text(rec for _, rec in iter_records(root))
        out = root / "results.csv"
        atomic_write_text(out, text)
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

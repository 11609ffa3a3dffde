"""Convert result records of the one-file-per-row layout into run folders (manifest + rows), losslessly.

    python scripts/migrate_records.py [--results-dir results] [--dry-run]

The old layout wrote every row as ``runs/<experiment>/<record_id>.json`` carrying the run's config,
git, device, versions and argv again. This script groups those files by (experiment, run_id) and writes
``runs/<experiment>/<run_id>/{manifest.json,rows.jsonl,committed.json}`` (``common.results``):

* the manifest holds, for each run field, the value most of the run's records have (ties: the earliest
  record's); a record whose value differs keeps its own in its row, so no provenance is dropped;
* ``argv`` is made repo-relative (``common.paths.relative_argv``), the one intended change;
* before anything is deleted it checks that every old record, rebuilt from the new files, equals the old
  one (argv made relative), and that the ``results.csv`` text of the new layout is byte-identical to that
  of the old records and to the ``results.csv`` on disk. Only then are the new folders moved in and the
  old files removed; ``results.csv`` is then regenerated and compared once more.

A run interrupted after the move but before the deletion can be rerun: run folders already in place are
compared with what would be written and kept. Exit status: 0 done (or nothing to do), 1 a check failed
or a file is corrupt (nothing is deleted then).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from collections import Counter, defaultdict
from pathlib import Path

from common.paths import relative_argv
from common.results import (
    RECORD_KEYS,
    ROW_DEFAULTS,
    ROW_FIELDS,
    RUN_FIELDS,
    CorruptRecordError,
    csv_text,
    old_format_files,
    read_run,
    regenerate_csv,
    results_dir,
    run_dirs,
    validate_record,
    write_run_dir,
)

OLD_DEFAULTS = {"profile": None, "argv": [], **ROW_DEFAULTS}
MIGRATED = {"from": "one JSON file per row: runs/<experiment>/<record_id>.json", "by": "scripts/migrate_records.py"}


class MigrationError(RuntimeError):
    """A check failed; nothing was deleted."""


def _canon(x: object) -> str:
    return json.dumps(x, sort_keys=True)


def read_old_records(root: Path) -> list[tuple[Path, dict]]:
    """Every old-layout record, validated, with absent optional keys filled in as the old reader did."""
    out = []
    for path in old_format_files(root):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptRecordError(f"corrupt result record {path}: {exc}") from None
        validate_record(rec, str(path))
        unknown = sorted(set(rec) - set(RECORD_KEYS))
        if unknown:  # a field this layout has no place for would be lost
            raise CorruptRecordError(f"corrupt result record {path}: unknown keys {unknown}")
        if rec["experiment"] != path.parent.name:
            raise CorruptRecordError(f"corrupt result record {path}: experiment {rec['experiment']!r} "
                                     f"is not its folder's name")
        out.append((path, {**OLD_DEFAULTS, **rec}))
    return out


def expected_record(old: dict) -> dict:
    """What the new layout must give back for an old record: the same, with argv made repo-relative."""
    return {**old, "argv": relative_argv(old["argv"])}


def _mode(values: list) -> object:
    """The most common value (ties: the first seen)."""
    counts = Counter(_canon(v) for v in values)
    best = max(counts.values())
    return next(v for v in values if counts[_canon(v)] == best)


def plan_run(records: list[dict]) -> tuple[dict, list[dict]]:
    """Manifest and rows of one run from its expected records (sorted by record_id)."""
    manifest = {k: _mode([r[k] for r in records]) for k in RUN_FIELDS}
    manifest["end_time"] = max(r["end_time"] for r in records)
    manifest["migrated"] = {**MIGRATED, "records": len(records)}
    rows = []
    for r in records:
        row = {k: r[k] for k in ROW_FIELDS if not (k in ROW_DEFAULTS and r[k] == ROW_DEFAULTS[k])}
        row.update({k: r[k] for k in RUN_FIELDS if _canon(r[k]) != _canon(manifest[k])})
        rows.append(row)
    return manifest, rows


def _first_difference(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b)):
        if _canon(a.get(k)) != _canon(b.get(k)):
            return f"field {k!r}: old {_canon(a.get(k))[:80]} vs new {_canon(b.get(k))[:80]}"
    return "no difference"


def _size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def _run_files(dirs: list[Path]) -> list[Path]:
    return [f for d in dirs for f in sorted(d.iterdir()) if f.is_file()]


def verify(old: dict[tuple[str, str], dict], new_root: Path) -> str:
    """Check the staged layout against the old records; returns its results.csv text."""
    new = {}
    for _, rec in _iter_new(new_root):
        new[(rec["experiment"], rec["record_id"])] = rec
    if set(new) != set(old):
        missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        raise MigrationError(f"record sets differ: {len(missing)} missing (e.g. {missing[:1]}), "
                             f"{len(extra)} extra (e.g. {extra[:1]})")
    for key, rec in old.items():
        if _canon(new[key]) != _canon(expected_record(rec)):
            raise MigrationError(f"record {key[1]} changed: {_first_difference(expected_record(rec), new[key])}")
    return csv_text(new.values())


def _iter_new(root: Path):
    for d in run_dirs(root):
        _, records = read_run(d)
        for rec in records:
            yield d, rec


def migrate(root: Path, dry_run: bool = False, log=print) -> dict:
    """Migrate ``root/runs``; returns file counts and byte sizes before and after."""
    old_files = read_old_records(root)
    if not old_files:
        log(f"no old-layout records under {root / 'runs'}: nothing to migrate")
        return {"migrated": 0}
    old = {(r["experiment"], r["record_id"]): r for _, r in old_files}
    if len(old) != len(old_files):
        raise MigrationError("two old record files share (experiment, record_id)")
    old_csv = csv_text(old.values())
    csv_path = root / "results.csv"
    if csv_path.exists() and csv_path.read_text(encoding="utf-8") != old_csv:
        raise MigrationError(f"{csv_path} is not the table the old records give: regenerate it with the old "
                             "code (or delete it) before migrating, so that its equality can be proven")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for _, r in old_files:
        groups[(r["experiment"], r["run_id"])].append(expected_record(r))
    stage = root / f".migrate-{uuid.uuid4().hex[:8]}.tmp"
    try:
        for (exp, run_id), recs in sorted(groups.items()):
            manifest, rows = plan_run(sorted(recs, key=lambda r: r["record_id"]))
            write_run_dir(stage / "runs" / exp / run_id, manifest, rows)
        if verify(old, stage) != old_csv:
            raise MigrationError("results.csv of the new layout differs from the old one")
        staged = run_dirs(stage)
        stats = {"migrated": len(old), "runs": len(staged),
                 "files_before": len(old_files), "bytes_before": _size([p for p, _ in old_files]),
                 "files_after": len(_run_files(staged)), "bytes_after": _size(_run_files(staged))}
        if dry_run:
            log(f"dry run: checks passed; would write {stats}")
            return stats
        for d in staged:
            target = root / "runs" / d.parent.name / d.name
            if target.exists():  # an interrupted earlier migration: keep it if it is what we would write
                if _canon(read_run(target)[1]) != _canon(read_run(d)[1]):
                    raise MigrationError(f"{target} exists and differs from the migrated run")
                continue
            os.rename(d, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for p, _ in old_files:
        p.unlink()
    if regenerate_csv(root).read_text(encoding="utf-8") != old_csv:  # cannot happen after verify()
        raise MigrationError("regenerated results.csv differs from the old one")
    log(f"migrated {stats['migrated']} records into {stats['runs']} run folders: "
        f"{stats['files_before']} files, {stats['bytes_before']:,} bytes -> {stats['files_after']} files, "
        f"{stats['bytes_after']:,} bytes ({stats['bytes_before'] / stats['bytes_after']:.1f}x smaller); "
        "results.csv byte-identical")
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", default=None, help="results root (default: $LLM4ALL_RESULTS or results/)")
    p.add_argument("--dry-run", action="store_true", help="run every check, change nothing")
    args = p.parse_args(argv)
    root = Path(args.results_dir).resolve() if args.results_dir else results_dir()
    try:
        migrate(root, dry_run=args.dry_run)
    except (CorruptRecordError, MigrationError, TypeError) as exc:
        print(f"error: {exc}; nothing was deleted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

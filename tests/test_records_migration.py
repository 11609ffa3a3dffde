"""scripts/migrate_records.py (old one-file-per-row records -> run folders) and the repository's records.

The oracle for the migration is a frozen copy of what the old ``common.results`` wrote and read: records
as ``json.dumps(rec, indent=1, sort_keys=True)`` files, and its ``results.csv`` logic below.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest

from common.paths import REPO_ROOT
from common.results import CorruptRecordError, csv_text, iter_records, old_format_files, read_run, run_dirs

_spec = importlib.util.spec_from_file_location("migrate_records", REPO_ROOT / "scripts" / "migrate_records.py")
migrate_records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(migrate_records)

OLD_CSV_COLUMNS = [
    "experiment", "table", "method", "metric", "value", "stderr", "n", "params", "seed",
    "git_commit", "git_dirty", "device", "run_id", "record_id", "profile", "start_time", "end_time",
]


def old_csv(records: list[dict]) -> str:
    """Frozen copy of the old regenerate_csv's text (before the compact layout)."""
    rows = [{
        "experiment": r["experiment"], "table": r["table"], "method": r["method"], "metric": r["metric"],
        "value": r["value"], "stderr": r.get("stderr"), "n": r.get("n"),
        "params": json.dumps(r.get("params") or {}, sort_keys=True), "seed": r["seed"],
        "git_commit": r["git"].get("commit"), "git_dirty": r["git"].get("dirty"), "device": r["device"],
        "run_id": r["run_id"], "record_id": r["record_id"], "profile": r.get("profile"),
        "start_time": r["start_time"], "end_time": r["end_time"]} for r in records]
    rows.sort(key=lambda r: (r["experiment"], r["table"], r["method"], r["metric"], r["record_id"]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=OLD_CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def old_record(experiment: str, run_id: str, i: int, **kw) -> dict:
    """A record as the old Run.log built it."""
    rec = {"experiment": experiment, "table": "t", "method": f"m{i % 3}", "metric": "acc", "value": 0.5 + i,
           "stderr": None, "n": None, "params": {"i": i}, "seed": 0, "profile": "quick",
           "config": {"lr": 0.1, "data": {"path": "x"}}, "git": {"commit": "a" * 40, "dirty": False},
           "device": "CPU: Test x2", "versions": {"python": "3.11.7", "torch": "2.0"},
           "argv": [str(REPO_ROOT / f"{experiment}/run.py"), "--profile", "quick",
                    f"--data-dir={REPO_ROOT.parent}/shared/data"],
           "run_id": run_id, "record_id": f"{run_id}-{i:05d}", "start_time": "2026-01-01T00:00:00+00:00",
           "end_time": f"2026-01-01T00:00:{i:02d}+00:00", "extra": {}}
    rec.update(kw)
    return rec


def write_old(root: Path, records: list[dict]) -> None:
    for rec in records:
        path = root / "runs" / rec["experiment"] / f"{rec['record_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1, sort_keys=True, allow_nan=False))
    (root / "results.csv").write_text(old_csv(records))


def sample_records() -> list[dict]:
    a, b, c = "20260101-000000-aaaaaaaa", "20260101-000100-bbbbbbbb", "20260101-000200-cccccccc"
    recs = [old_record("exp_x", a, i) for i in range(1, 7)]
    recs[1].update(seed=2, stderr=0.01, n=100, extra={"note": "ä"})       # per-row seed
    recs[2].update(device="NVIDIA H100", value=None)                       # per-row device, null value
    recs[3].update(config={"lr": 0.2, "data": {"path": "x"}}, git={"commit": "b" * 40, "dirty": True},
                   versions={"python": "3.12"}, argv=["/elsewhere/run.py"], profile=None)  # everything differs
    recs += [old_record("exp_x", b, i, params={}) for i in range(1, 3)]
    recs += [old_record("exp_y", c, 1, seed=None, config=None)]
    return recs


def test_migration_is_lossless(tmp_path):
    recs = sample_records()
    write_old(tmp_path, recs)
    before = (tmp_path / "results.csv").read_bytes()
    assert migrate_records.main(["--results-dir", str(tmp_path)]) == 0
    assert (tmp_path / "results.csv").read_bytes() == before  # byte-identical table
    assert old_format_files(tmp_path) == []
    assert [d.name for d in run_dirs(tmp_path)] == sorted({r["run_id"] for r in recs})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".migrate")]
    new = {rec["record_id"]: rec for _, rec in iter_records(tmp_path)}
    assert len(new) == len(recs)
    for old in recs:  # every old record's provenance is recoverable from the new files
        got = new[old["record_id"]]
        for key in ["config", "git", "device", "versions", "seed", "profile", "start_time", "end_time",
                    "value", "stderr", "n", "params", "extra", "table", "method", "metric"]:
            assert got[key] == old[key], (old["record_id"], key)
        assert set(got) == set(old)
    rel = ["exp_x/run.py", "--profile", "quick", "--data-dir=data"]  # repo-relative; outside: the name only
    assert new[recs[0]["record_id"]]["argv"] == rel
    assert new[recs[3]["record_id"]]["argv"] == ["run.py"]
    manifest, _ = read_run(run_dirs(tmp_path)[0])
    assert manifest["config"] == {"lr": 0.1, "data": {"path": "x"}} and manifest["seed"] == 0  # majority
    rows = (run_dirs(tmp_path)[0] / "rows.jsonl").read_text().splitlines()
    assert "config" in json.loads(rows[3]) and "config" not in json.loads(rows[0])
    assert migrate_records.main(["--results-dir", str(tmp_path)]) == 0  # nothing left to do


def test_migration_refuses_and_keeps_old_files_when_a_check_fails(tmp_path, capsys):
    recs = sample_records()
    write_old(tmp_path, recs)
    (tmp_path / "results.csv").write_text("stale\n")
    assert migrate_records.main(["--results-dir", str(tmp_path)]) == 1
    assert "results.csv" in capsys.readouterr().err
    assert len(old_format_files(tmp_path)) == len(recs) and run_dirs(tmp_path) == []
    write_old(tmp_path, recs)
    bad = old_format_files(tmp_path)[2]
    bad.write_text(bad.read_text().replace('"git": {', '"git": "abc", "old_git": {'))
    assert migrate_records.main(["--results-dir", str(tmp_path)]) == 1
    assert bad.name in capsys.readouterr().err
    assert len(old_format_files(tmp_path)) == len(recs) and run_dirs(tmp_path) == []
    write_old(tmp_path, recs)
    assert migrate_records.main(["--results-dir", str(tmp_path), "--dry-run"]) == 0
    assert len(old_format_files(tmp_path)) == len(recs) and run_dirs(tmp_path) == []


def test_migration_resumes_after_an_interrupted_move(tmp_path, monkeypatch):
    recs = sample_records()
    write_old(tmp_path, recs)
    before = (tmp_path / "results.csv").read_bytes()
    real_unlink = Path.unlink

    def dies(self, *a, **kw):
        raise KeyboardInterrupt  # killed after the new folders moved in, before old files went
    monkeypatch.setattr(Path, "unlink", dies)
    with pytest.raises(KeyboardInterrupt):
        migrate_records.migrate(tmp_path, log=lambda s: None)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert run_dirs(tmp_path) and old_format_files(tmp_path)
    with pytest.raises(CorruptRecordError, match="migrate_records"):  # mixed layouts are not read silently
        list(iter_records(tmp_path))
    assert migrate_records.main(["--results-dir", str(tmp_path)]) == 0
    assert (tmp_path / "results.csv").read_bytes() == before and not old_format_files(tmp_path)


# ------------------------------------------------------------------------- the repository's records
REPO_RESULTS = REPO_ROOT / "results"


def test_repository_records_are_valid_compact_and_give_the_committed_csv():
    if not (REPO_RESULTS / "runs").is_dir():
        pytest.skip("no committed records")
    assert old_format_files(REPO_RESULTS) == []
    recs = [rec for _, rec in iter_records(REPO_RESULTS)]  # validates every manifest and row
    assert recs
    assert csv_text(recs) == (REPO_RESULTS / "results.csv").read_text(encoding="utf-8")
    assert not [a for r in recs for a in r["argv"] if a.startswith("/") or "=/" in a]  # no machine paths
    files = [f for d in run_dirs(REPO_RESULTS) for f in d.iterdir() if f.is_file()]
    new_bytes = sum(f.stat().st_size for f in files)
    old_bytes = sum(len(json.dumps(r, indent=1, sort_keys=True, allow_nan=False).encode()) for r in recs)
    assert old_bytes >= 5 * new_bytes, (old_bytes, new_bytes)

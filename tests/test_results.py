"""common.results: run folders (manifest + rows), concurrent writers, crash mid-write, truncated and
wrong-typed records, csv, loader."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from common import results
from common.paths import REPO_ROOT
from common.results import CorruptRecordError, Run, iter_records, load_results, regenerate_csv
from tests.conftest import PYTHON, subprocess_env


def _writer(root: str, worker: int, n: int) -> None:
    run = Run("exp_test", config={"worker": worker}, seed=worker, root=Path(root))
    for i in range(n):
        run.log(table="t1", method=f"w{worker}", metric="m", value=float(i), params={"i": i})
    run.finish()


def _only_run_dir(root: Path, experiment: str = "exp_test") -> Path:
    (d,) = [p for p in (root / "runs" / experiment).iterdir() if not p.name.startswith(".")]
    return d


def _rewrite_rows(run_dir: Path, lines: list[str]) -> None:
    """Replace a run's rows and keep its commit consistent, so that only the content is at fault."""
    data = "".join(line + "\n" for line in lines).encode()
    (run_dir / "rows.jsonl").write_bytes(data)
    (run_dir / "committed.json").write_text(json.dumps({"rows": len(lines), "bytes": len(data)}))


def test_concurrent_writers_lose_nothing(tmp_path):
    results.is_main_process(), results.device_name()  # import torch once here, not in each forked writer
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 50)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    recs = list(iter_records(tmp_path))
    assert len(recs) == 400
    assert len({r["record_id"] for _, r in recs}) == 400
    run_dirs = sorted((tmp_path / "runs" / "exp_test").iterdir())
    assert len(run_dirs) == 8  # one folder per run, three files each, whatever the number of rows
    assert all(sorted(p.name for p in d.iterdir()) == ["committed.json", "manifest.json", "rows.jsonl"]
               for d in run_dirs)
    df = load_results(tmp_path)
    assert len(df) == 400  # the csv regenerated last (under the lock) saw every record
    assert sorted(df.groupby("method").size().tolist()) == [50] * 8
    assert set(df["p.i"]) == set(range(50))
    assert all(df["seed"] == df["method"].str[1:].astype(int))  # each run's seed, from its manifest


def test_record_contents_and_deterministic_csv(tmp_path):
    run = Run("exp_test", config={"a": 1}, seed=7, profile="quick", root=tmp_path)
    path = run.log(table="fig1", method="x", metric="acc", value=0.5, stderr=0.01, n=100, params={"k": 2})
    assert path == tmp_path / "runs" / "exp_test" / run.run_id / "rows.jsonl"
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["config"] == {"a": 1} and manifest["seed"] == 7 and manifest["profile"] == "quick"
    assert manifest["git"]["commit"] and "dirty" in manifest["git"] and manifest["versions"]["torch"]
    assert not any(a.startswith("/") for a in manifest["argv"])  # repo-relative, no machine path
    row = json.loads(path.read_text().splitlines()[0])
    assert set(row) == {"table", "method", "metric", "value", "stderr", "n", "params", "record_id", "end_time"}
    ((_, rec),) = list(iter_records(tmp_path))
    for key in ["experiment", "table", "method", "metric", "value", "stderr", "n", "config", "seed", "git",
                "device", "versions", "argv", "run_id", "record_id", "start_time", "end_time", "extra"]:
        assert key in rec
    assert (rec["config"], rec["seed"], rec["value"], rec["stderr"], rec["n"]) == ({"a": 1}, 7, 0.5, 0.01, 100)
    run.log(table="fig1", method="a", metric="acc", value=float("nan"))  # non-finite -> null, not invalid JSON
    run.log(table="fig1", method="b", metric="acc", value=1.0, seed=8, device="GPU: other", extra={"e": 1})
    recs = [r for _, r in iter_records(tmp_path)]
    assert recs[1]["value"] is None and recs[1]["seed"] == 7
    assert (recs[2]["seed"], recs[2]["device"], recs[2]["extra"]) == (8, "GPU: other", {"e": 1})
    first = regenerate_csv(tmp_path).read_bytes()
    second = regenerate_csv(tmp_path).read_bytes()
    assert first == second and first.splitlines()[0].startswith(b"experiment,table,method")
    assert first.splitlines()[1].split(b",")[2] == b"a"  # sorted by method


def test_update_manifest_merges_and_protects_provenance(tmp_path):
    run = Run("exp_test", config={"a": 1}, root=tmp_path)
    assert run.update_manifest(stages={"a": {"seconds": 1.5}}) is None  # no row yet: nothing on disk
    assert not (tmp_path / "runs").exists()
    run.log(table="t", method="m", metric="v", value=1.0)
    run.update_manifest(stages={"b": {"seconds": 2.0}}, note="x")
    with pytest.raises(ValueError, match="config"):
        run.update_manifest(config={"a": 2})
    with pytest.raises((TypeError, ValueError)):
        run.update_manifest(bad=object())
    run.finish()
    m = json.loads((run.run_dir / "manifest.json").read_text())
    assert m["stages"] == {"a": {"seconds": 1.5}, "b": {"seconds": 2.0}} and m["note"] == "x"
    assert m["config"] == {"a": 1} and m["end_time"] >= m["start_time"]
    assert [r["value"] for _, r in iter_records(tmp_path)] == [1.0]
    assert not list(run.run_dir.glob("*.tmp")) and not list(run.run_dir.parent.glob(".*"))


def test_a_run_without_rows_writes_nothing(tmp_path):
    run = Run("exp_test", root=tmp_path)
    run.finish()
    assert not (tmp_path / "runs").exists()
    assert (tmp_path / "results.csv").read_text().startswith("experiment,table")


_CRASH_SCRIPT = """
import os, sys, time
from pathlib import Path
from common import results
from common.paths import REPO_ROOT
run = results.Run('exp_crash', root=Path(sys.argv[1]))
for i in range(3):
    run.log(table='t', method='m', metric='v', value=float(i))
where = sys.argv[2]
if where == 'mid_line':          # the kernel wrote part of the line, then the process dies
    orig = os.pwrite
    def half(fd, data, offset):
        orig(fd, bytes(data[: len(data) // 2]), offset)
        print('in-write', flush=True)
        time.sleep(60)
    os.pwrite = half
else:                            # the whole line is written, the commit is not yet
    orig = os.fsync
    def slow(fd):
        orig(fd)
        print('in-write', flush=True)
        time.sleep(60)
    os.fsync = slow
run.log(table='t', method='m', metric='v', value=99.0, extra={'blob': 'x' * 100_000})
"""


@pytest.mark.parametrize("where", ["mid_line", "before_commit"])
def test_sigkill_mid_write_leaves_no_partial_row(tmp_path, where):
    """SIGKILL a writer inside the write of a row: the rows logged before stay, the one in flight is
    invisible, and nothing is reported as corrupt."""
    proc = subprocess.Popen([PYTHON, "-c", _CRASH_SCRIPT, str(tmp_path), where], env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "in-write"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = _only_run_dir(tmp_path, "exp_crash")
    committed = json.loads((run_dir / "committed.json").read_text())
    assert committed["rows"] == 3
    assert (run_dir / "rows.jsonl").stat().st_size > committed["bytes"], "the kill did not land mid-write"
    assert [r["value"] for _, r in iter_records(tmp_path)] == [0.0, 1.0, 2.0]
    assert len(load_results(regenerate_csv(tmp_path).parent)) == 3


def test_truncated_row_file_is_reported_by_name(tmp_path):
    run = Run("exp_test", root=tmp_path)
    for i in range(5):
        run.log(table="t", method="m", metric="v", value=float(i), params={"i": i})
    run.finish()
    rows = run.run_dir / "rows.jsonl"
    data = rows.read_bytes()
    rows.write_bytes(data[: len(data) - 10])  # cut inside the last row
    with pytest.raises(CorruptRecordError, match=r"rows\.jsonl.*truncated"):
        regenerate_csv(tmp_path)
    rows.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 1])  # cut exactly after row 4
    with pytest.raises(CorruptRecordError, match=r"rows\.jsonl.*truncated"):
        list(iter_records(tmp_path))
    rows.write_bytes(data)
    assert len(list(iter_records(tmp_path))) == 5


def test_corrupt_files_are_reported_by_name(tmp_path):
    run = Run("exp_test", root=tmp_path)
    run.log(table="t", method="m", metric="v", value=1.0)
    run.log(table="t", method="m", metric="v", value=2.0)
    lines = (run.run_dir / "rows.jsonl").read_text().splitlines()
    _rewrite_rows(run.run_dir, [lines[0], '{"table": "t", "value": '])
    with pytest.raises(CorruptRecordError, match=r"rows\.jsonl:2"):
        regenerate_csv(tmp_path)
    _rewrite_rows(run.run_dir, [lines[0], '{"table": "t", "value": NaN}'])
    with pytest.raises(CorruptRecordError, match=r"rows\.jsonl:2"):
        list(iter_records(tmp_path))
    _rewrite_rows(run.run_dir, lines)
    manifest = run.run_dir / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[:40])
    with pytest.raises(CorruptRecordError, match=r"manifest\.json"):
        list(iter_records(tmp_path))
    manifest.write_text(good)
    (run.run_dir / "committed.json").write_text('{"rows": "2"}')
    with pytest.raises(CorruptRecordError, match=r"committed\.json"):
        list(iter_records(tmp_path))
    _rewrite_rows(run.run_dir, lines)
    old = tmp_path / "runs" / "exp_test" / "20260101-000000-abcdef01-00001.json"
    old.write_text("{}")
    with pytest.raises(CorruptRecordError, match="migrate_records"):
        list(iter_records(tmp_path))
    old.unlink()
    assert len(list(iter_records(tmp_path))) == 2


@pytest.mark.parametrize("field,bad", [("value", '"oops"'), ("params", "[1, 2]"), ("n", "1.5"),
                                       ("stderr", "true"), ("seed", '"7"'), ("extra", '"x"'),
                                       ("method", "3"), ("device", "{}"), ("surprise", "1")])
def test_wrong_type_in_a_row_is_named(tmp_path, field, bad):
    run = Run("exp_test", root=tmp_path)
    run.log(table="t", method="m", metric="v", value=1.0)
    run.log(table="t", method="m", metric="v", value=2.0)
    lines = (run.run_dir / "rows.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row[field] = json.loads(bad)
    _rewrite_rows(run.run_dir, [lines[0], json.dumps(row)])
    with pytest.raises(CorruptRecordError, match=rf"rows\.jsonl:2.*'{field}'"):
        regenerate_csv(tmp_path)


@pytest.mark.parametrize("field,bad", [("git", "abc"), ("git", {"commit": "x"}), ("config", [1]),
                                       ("versions", {"torch": 2}), ("argv", "run.py"), ("seed", 1.5),
                                       ("experiment", "exp_other"), ("format", 99)])
def test_wrong_type_in_a_manifest_is_named(tmp_path, field, bad):
    run = Run("exp_test", root=tmp_path)
    run.log(table="t", method="m", metric="v", value=1.0)
    path = run.run_dir / "manifest.json"
    m = json.loads(path.read_text())
    m[field] = bad
    path.write_text(json.dumps(m))
    with pytest.raises(CorruptRecordError, match=r"manifest\.json"):
        load_results(tmp_path, from_records=True)


def test_wrong_types_are_refused_when_logging(tmp_path):
    run = Run("exp_test", root=tmp_path)
    with pytest.raises(TypeError, match="params"):
        run.log(table="t", method="m", metric="v", value=1.0, params=[1, 2])
    with pytest.raises(TypeError, match="extra"):
        run.log(table="t", method="m", metric="v", value=1.0, extra="x")
    with pytest.raises(TypeError, match="'seed'"):
        run.log(table="t", method="m", metric="v", value=1.0, seed="7")
    run.log(table="t", method="m", metric="v", value=1.0)
    assert [r["record_id"][-5:] for _, r in iter_records(tmp_path)] == ["00001"]


def test_log_does_constant_work_per_row(tmp_path, monkeypatch):
    """No growing file is rewritten per row: every write during ``log`` is the new line or the commit."""
    run = Run("exp_test", root=tmp_path)
    run.log(table="t", method="m", metric="v", value=0.0)
    writes: list[int] = []
    orig_pwrite, orig_atomic = os.pwrite, results.atomic_write_text
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: writes.append(len(data)) or orig_pwrite(fd, data, off))
    monkeypatch.setattr(results, "atomic_write_text",
                        lambda p, text, **kw: writes.append(len(text)) or orig_atomic(p, text, **kw))
    for i in range(300):
        run.log(table="t", method="m", metric="v", value=float(i), params={"i": i})
    assert len(writes) == 600 and max(writes) < 200


def test_run_is_written_by_its_own_process_only(tmp_path):
    run = Run("exp_test", root=tmp_path)
    run.log(table="t", method="m", metric="v", value=1.0)
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        try:
            run.log(table="t", method="m", metric="v", value=2.0)
            q.put("logged")
        except RuntimeError as exc:
            q.put(str(exc))

    p = ctx.Process(target=child)
    p.start()
    p.join(60)
    assert "one Run per process" in q.get(timeout=5)
    assert len(list(iter_records(tmp_path))) == 1


def test_only_main_process_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    run = Run("exp_test", root=tmp_path)
    assert run.log(table="t", method="m", metric="v", value=1.0) is None
    assert run.update_manifest(x=1) is None
    assert run.finish() is None
    assert not (tmp_path / "runs").exists()


def test_value_must_be_numeric(tmp_path):
    with pytest.raises(TypeError, match="t/m/v"):
        Run("exp_test", root=tmp_path).log(table="t", method="m", metric="v", value="high")


def test_results_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM4ALL_RESULTS", str(tmp_path / "r"))
    assert results.results_dir() == (tmp_path / "r").resolve()
    assert subprocess.run([PYTHON, "-c", "import common.results"], env=subprocess_env()).returncode == 0


def test_latest_rows_replaces_rerun_rows_keeps_distinct_ones(tmp_path):
    from common.results import latest_rows

    old = Run("exp_test", config={}, seed=0, profile="quick", root=tmp_path)
    old.log(table="t", method="m", metric="acc", value=0.1, params={"k": 1})
    old.log(table="t", method="m", metric="acc", value=0.2, params={"k": 2})
    time.sleep(1.1)  # start_time has one-second resolution at worst
    new = Run("exp_test", config={}, seed=0, profile="quick", root=tmp_path)
    new.log(table="t", method="m", metric="acc", value=0.3, params={"k": 1})
    regenerate_csv(tmp_path)
    df = latest_rows(load_results(tmp_path))
    assert sorted(zip(df["p.k"], df["value"])) == [(1, 0.3), (2, 0.2)]


@pytest.mark.parametrize("target,field,bad", [("manifest.json", "git", "abc"), ("rows.jsonl", "value", "oops")])
def test_make_figures_names_a_wrong_typed_record_and_exits_nonzero(tmp_path, target, field, bad):
    """End to end: a record that is valid JSON with a wrong type stops the figures/report with one line
    naming the file, a non-zero exit and no traceback, and the report is not written from it."""
    run = Run("exp_test", root=tmp_path)
    run.log(table="t", method="m", metric="v", value=1.0)
    run.finish()
    path = run.run_dir / target
    if target == "manifest.json":
        m = json.loads(path.read_text())
        m[field] = bad
        path.write_text(json.dumps(m))
    else:
        row = json.loads(path.read_text())
        row[field] = bad
        _rewrite_rows(run.run_dir, [json.dumps(row)])
    proc = subprocess.run([PYTHON, "results/make_figures.py", "--results-dir", str(tmp_path), "--no-figures"],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert str(path) in line and f"'{field}'" in line, line
    assert not (tmp_path / "REPORT.md").exists()

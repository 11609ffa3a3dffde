"""common.results: atomic records, concurrent writers, crash mid-write, corrupt records, csv, loader."""

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
from common.results import CorruptRecordError, Run, iter_records, load_results, regenerate_csv
from tests.conftest import PYTHON, subprocess_env


def _writer(root: str, worker: int, n: int) -> None:
    run = Run("exp_test", config={"worker": worker}, seed=worker, root=Path(root))
    for i in range(n):
        run.log(table="t1", method=f"w{worker}", metric="m", value=float(i), params={"i": i})
    run.finish()


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 50)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    recs = list(iter_records(tmp_path))
    assert len(recs) == 400
    df = load_results(tmp_path)
    assert len(df) == 400  # the csv regenerated last (under the lock) saw every record
    assert sorted(df.groupby("method").size().tolist()) == [50] * 8
    assert set(df["p.i"]) == set(range(50))


def test_record_contents_and_deterministic_csv(tmp_path):
    run = Run("exp_test", config={"a": 1}, seed=7, profile="quick", root=tmp_path)
    path = run.log(table="fig1", method="x", metric="acc", value=0.5, stderr=0.01, n=100, params={"k": 2})
    rec = json.loads(path.read_text())
    for key in ["experiment", "table", "method", "metric", "value", "stderr", "n", "config", "seed", "git",
                "device", "versions", "start_time", "end_time"]:
        assert key in rec
    assert rec["git"]["commit"] and "dirty" in rec["git"] and rec["versions"]["torch"]
    assert path.parent == tmp_path / "runs" / "exp_test"
    run.log(table="fig1", method="a", metric="acc", value=float("nan"))  # non-finite -> null, not invalid JSON
    first = regenerate_csv(tmp_path).read_bytes()
    second = regenerate_csv(tmp_path).read_bytes()
    assert first == second and first.splitlines()[0].startswith(b"experiment,table,method")
    assert first.splitlines()[1].split(b",")[2] == b"a"  # sorted by method


def test_crash_mid_write_leaves_no_partial_record(tmp_path):
    """SIGKILL a writer while it is inside the write of a large record: no visible partial file."""
    script = (
        "import os, sys, time\nfrom pathlib import Path\nfrom common import results\n"
        "orig = os.fsync\n"
        "def slow_fsync(fd):\n    time.sleep(30)\n    orig(fd)\n"
        "os.fsync = slow_fsync\n"
        "run = results.Run('exp_crash', root=Path(sys.argv[1]))\n"
        "print('ready', flush=True)\n"
        "run.log(table='t', method='m', metric='v', value=1.0, extra={'blob': 'x' * 5_000_000})\n")
    proc = subprocess.Popen([PYTHON, "-c", script, str(tmp_path)], env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "runs" / "exp_crash").glob(".*.tmp")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "runs" / "exp_crash").glob(".*.tmp")), "the kill did not land mid-write"
    assert list(iter_records(tmp_path)) == []  # the temp file is invisible to readers
    regenerate_csv(tmp_path)


def test_corrupt_record_is_reported_by_name(tmp_path):
    Run("exp_test", root=tmp_path).log(table="t", method="m", metric="v", value=1.0)
    bad = tmp_path / "runs" / "exp_test" / "broken.json"
    bad.write_text('{"experiment": "exp_test", "value": ')
    with pytest.raises(CorruptRecordError, match="broken.json"):
        regenerate_csv(tmp_path)
    bad.write_text('{"experiment": "exp_test"}')
    with pytest.raises(CorruptRecordError, match="broken.json.*missing keys"):
        list(iter_records(tmp_path))


def test_only_main_process_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    run = Run("exp_test", root=tmp_path)
    assert run.log(table="t", method="m", metric="v", value=1.0) is None
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

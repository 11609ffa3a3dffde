"""exp_tor under `accelerate launch --multi_gpu --num_processes 2` on CPU (a gloo world of 2; `--cpu` would
silently run one process): the work is shared out over the ranks, the rows are written once, by the main
process, and equal the one-process run's rows (issue 16, item 24)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from common.results import read_run, run_dirs
from tests.conftest import REPO, subprocess_env

RUN = REPO / "exp_tor" / "run.py"
# the quick profile's closed, simulate and planning stages on a small grid (12 seeded Monte Carlo runs)
TINY = ["--profile", "quick", "--stage", "closed,simulate,planning", "sim.n_cycles=2000", "sim.taus=[30.0]",
        "sim.mtbfs=[180.0,720.0]", "closed.curve_points=5"]
pytestmark = pytest.mark.slow


def _env(root: Path) -> dict:
    return subprocess_env(LLM4ALL_RESULTS=str(root / "results"), LLM4ALL_OUTPUTS=str(root / "outputs"))


def _runs(root: Path) -> list[tuple[dict, list[dict]]]:
    return [read_run(d) for d in run_dirs(root / "results")]


def _values(rows: list[dict]) -> dict[tuple, float]:
    """Every row but the stage timings, keyed by what identifies it; a row logged twice fails here."""
    vals = {}
    for r in rows:
        if r["table"] == "stage_time":
            continue
        key = (r["table"], r["method"], r["metric"], json.dumps(r.get("params") or {}, sort_keys=True))
        assert key not in vals, f"row logged twice: {key}"
        vals[key] = (r["value"], r.get("stderr"), r.get("n"))
    return vals


def _launch(root: Path, args: list[str], port: int) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate CLI not installed next to this python")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(RUN), *args]
    # its own process group: on a timeout the ranks and their trainers go too, not only the launcher
    proc = subprocess.Popen(cmd, env=_env(root), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=500)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"launch timed out after 500 s: {out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_processes_share_the_work_and_write_the_one_process_rows(tmp_path):
    ref = subprocess.run([sys.executable, str(RUN), *TINY], env=_env(tmp_path / "one"), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    proc = _launch(tmp_path / "two", TINY, 29531)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    (manifest, rows), = _runs(tmp_path / "two")            # one run folder: the main process's
    assert manifest.get("world_size") == 2, "not a 2-process world"
    assert "[exp_tor simulate] rank 0/2: 6 of 12 jobs" in out and "[exp_tor simulate] rank 1/2: 6 of 12 jobs" in out
    (_, want_rows), = _runs(tmp_path / "one")
    want, got = _values(want_rows), _values(rows)
    assert got.keys() == want.keys()
    assert {k for k in want if got[k] != want[k]} == set()  # same seeds per Monte Carlo run: bit-identical
    # one summary per stage, written by the main process, equal to the one-process summary
    for stage, name in (("closed", "closed.json"), ("simulate", "simulate.json"), ("planning", "planning.json")):
        (one,) = (tmp_path / "one" / "outputs" / "exp_tor" / stage).glob(f"*/{name}")
        (two,) = (tmp_path / "two" / "outputs" / "exp_tor" / stage).glob(f"*/{name}")
        assert json.loads(two.read_text()) == json.loads(one.read_text()), stage


def test_two_processes_share_the_harness_jobs(tmp_path, data_root):
    """The harness's jobs (validation + sweep) are shared out, each process prints a line per finished job with
    an ETA, and the main process logs every job's rows once."""
    args = ["--profile", "quick", "--stage", "harness", "harness.job.steps=40", "harness.job.checkpoint_every=20",
            "harness.job.mtbf_s=1.5", "harness.job.repair_s=0.1", "harness.job.slow_mtbf_s=1.0",
            "harness.job.slow_duration_s=0.3", "harness.job.restart=warm",
            "harness.job.n_seqs=256", "harness.sweep_intervals=[10,40]", "harness.sweep_steps=40",
            "harness.sweep_mtbf_s=1.0", "harness.sweep_fault_seeds=[1]", "harness.sweep_parallel=1"]
    proc = _launch(tmp_path, args, 29533)
    out = proc.stdout + proc.stderr
    print(proc.stdout[-4000:])   # the progress lines (shown with -rP or on failure)
    assert proc.returncode == 0, out[-6000:]
    (manifest, rows), = _runs(tmp_path)
    assert manifest.get("world_size") == 2
    # 3 jobs: rank 0 runs the validation job and sweep interval 40, rank 1 sweep interval 10
    assert "[exp_tor harness] rank 0/2: 2 of 3 jobs" in out and "[exp_tor harness] rank 1/2: 1 of 3 jobs" in out
    assert "job 1/1 sweep_seed1_every10: done in" in out and "(rank 1/2)" in out and "ETA" in out
    # no row twice (an optimal set of several intervals is several rows with equal params: the value tells them apart)
    seen = Counter((r["table"], r["method"], r["metric"], json.dumps(r.get("params") or {}, sort_keys=True),
                    r["value"]) for r in rows if r["table"] != "stage_time")
    assert max(seen.values()) == 1, [k for k, c in seen.items() if c > 1][:3]
    observed = [r for r in rows if r["method"] == "observed" and r["metric"] == "tor"]
    assert sorted((r["table"], (r.get("params") or {}).get("checkpoint_every")) for r in observed) == \
        [("harness_interval_sweep", 10), ("harness_interval_sweep", 40), ("harness_validation", 20)]
    assert {(r.get("params") or {}).get("processes") for r in observed if r["table"] == "harness_interval_sweep"} \
        == {2}

"""The stage runner: folders per config hash, skip when complete, SIGKILL midway, a stage alone from disk."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import to_dict
from common.results import load_results
from common.stages import Pipeline, Stage, StageContext, StageInputError, peak_rss_mib, reset_peak_rss
from tests.conftest import REPO, subprocess_env
from tests.helpers import toy_stages

TOY = REPO / "tests" / "helpers" / "toy_stages.py"


def run_toy(outputs: Path, results: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = subprocess_env(LLM4ALL_OUTPUTS=str(outputs), LLM4ALL_RESULTS=str(results))
    return subprocess.run([sys.executable, str(TOY), "--profile", "quick", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def tree(root: Path) -> dict[str, str]:
    """Every output file's content except the per-run bookkeeping (times, run ids)."""
    skip = {"COMPLETE.json", "LOGGED.json"}
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def test_hash_covers_only_declared_keys_and_inputs():
    p = Pipeline("toy", toy_stages.STAGES)
    a = toy_stages.Config()
    b = toy_stages.Config(label="other")
    c = toy_stages.Config(n=7)
    da, db, dc = to_dict(a), to_dict(b), to_dict(c)
    assert p.key("numbers", da) == p.key("numbers", db)     # label is not a key of 'numbers'
    assert p.key("squares", da) == p.key("squares", db)
    assert p.key("total", da) != p.key("total", db)          # ... but of 'total'
    assert p.key("numbers", da) != p.key("numbers", dc)     # n changes numbers
    assert p.key("total", da) != p.key("total", dc)          # and, through the inputs, everything after


def test_inputs_must_be_declared_before():
    with pytest.raises(ValueError, match="not declared before"):
        Pipeline("bad", [Stage("b", lambda ctx: None, inputs=("a",)), Stage("a", lambda ctx: None)])


def test_missing_input_and_optional_input(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM4ALL_OUTPUTS", str(tmp_path))
    seen = {}

    def reader(ctx: StageContext) -> None:
        seen["has"] = ctx.has_input("a")
        with pytest.raises(StageInputError, match="--stage a"):
            ctx.input("a")

    p = Pipeline("opt", [Stage("a", lambda ctx: None), Stage("b", reader, optional_inputs=("a",), cache=False)])

    class FakeRun:
        run_id = "x"

        def log(self, **kw):
            pass

    cfg = toy_stages.Config()
    p.run(cfg, FakeRun(), ["b"], log=lambda s: None)
    assert seen == {"has": False}                            # optional inputs are never run for it


def test_sigkill_midway_then_resume_equals_uninterrupted(tmp_path):
    # uninterrupted reference
    ref_out, ref_res = tmp_path / "ref_out", tmp_path / "ref_res"
    r = run_toy(ref_out, ref_res)
    assert r.returncode == 0, r.stderr
    # killed in the middle of 'squares'
    out, res = tmp_path / "out", tmp_path / "res"
    env = subprocess_env(LLM4ALL_OUTPUTS=str(out), LLM4ALL_RESULTS=str(res))
    proc = subprocess.Popen([sys.executable, str(TOY), "--profile", "quick", "pause=0.5"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("square 2/"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    squares_root = out / "toy_stages" / "squares"
    assert [p.name for p in squares_root.iterdir() if not p.name.startswith(".")] == []  # nothing complete
    assert any(p.name.startswith(".partial-") for p in squares_root.iterdir())
    assert not (res / "results.csv").exists() or "squares" not in (res / "results.csv").read_text()
    # rerun (no pause: pause is not a key of any stage, so the folders are the same)
    r = run_toy(out, res)
    assert r.returncode == 0, r.stderr
    assert "stage 1/3 numbers: skipped" in r.stdout
    assert "stage 2/3 squares: running" in r.stdout
    assert tree(out) == tree(ref_out)                        # same outputs as the uninterrupted run
    rows = load_results(res).query("table == 'toy'").sort_values(["method", "metric"])
    ref_rows = load_results(ref_res).query("table == 'toy'").sort_values(["method", "metric"])
    key = ["table", "method", "metric", "value"]
    assert rows[key].values.tolist() == ref_rows[key].values.tolist()
    # a third run skips everything and logs nothing new (except timing)
    r = run_toy(out, res)
    assert r.returncode == 0 and r.stdout.count(": skipped") == 3
    df = load_results(res)
    assert (df["table"] == "toy").sum() == 3


def test_single_stage_in_fresh_process_reads_from_disk(tmp_path):
    out, res = tmp_path / "out", tmp_path / "res"
    assert run_toy(out, res, "--stage", "numbers,squares").returncode == 0
    r = run_toy(out, res, "--stage", "total", "label=fresh")
    assert r.returncode == 0, r.stderr
    assert "numbers: skipped" not in r.stdout                # only the selected stage is considered
    total = next((out / "toy_stages" / "total").glob("*/total.json"))
    assert json.loads(total.read_text()) == {"label": "fresh", "total": sum(i * i for i in range(6))}
    # a new n has no squares on disk: --stage total runs the missing inputs first
    r = run_toy(out, res, "--stage", "total", "n=3")
    assert r.returncode == 0, r.stderr
    assert "input of a selected stage, missing for this config: running it" in r.stdout
    assert r.stdout.index("numbers") < r.stdout.index("squares") < r.stdout.index("stage 3/3 total")


def test_force_reruns_and_cli_errors(tmp_path):
    out, res = tmp_path / "out", tmp_path / "res"
    assert run_toy(out, res).returncode == 0
    r = run_toy(out, res, "--stage", "total", "--force")
    assert "total: running" in r.stdout and r.returncode == 0
    r = run_toy(out, res, "--stage", "bogus")
    assert r.returncode == 2 and "--stage: unknown stage(s) ['bogus']" in r.stderr
    r = run_toy(out, res, "--list-stages")
    assert r.returncode == 0 and r.stdout.count("complete") == 3
    r = run_toy(out, res, "--show-config")
    assert r.returncode == 0 and "label: toy" in r.stdout
    r = run_toy(out, res, "--help")
    assert r.returncode == 0 and "numbers, squares, total" in r.stdout and "\n    python tests/helpers" in r.stdout


def test_outputs_root_is_one_setting(tmp_path):
    res = tmp_path / "res"
    r = run_toy(tmp_path / "env_root", res, f"outputs_dir={tmp_path / 'cfg_root'}")
    assert r.returncode == 0
    assert (tmp_path / "cfg_root" / "toy_stages" / "total").is_dir()
    assert not (tmp_path / "env_root").exists()
    t0 = time.time()
    r = run_toy(tmp_path / "env_root", res, "--outputs-dir", str(tmp_path / "cli_root"))
    assert r.returncode == 0 and (tmp_path / "cli_root" / "toy_stages").is_dir()
    assert time.time() - t0 < 60


def _vm_rss_mib() -> float:
    # the kernel's current resident set (VmRSS), an oracle independent of the high-water mark
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_peak_rss_rises_with_an_allocation_and_resets_after_it_is_freed():
    if not reset_peak_rss() or peak_rss_mib() is None:
        pytest.skip("no /proc/self/clear_refs high-water-mark reset on this kernel")
    before = peak_rss_mib()
    assert before >= _vm_rss_mib() - 1                # the high-water mark is never below the current RSS
    # fresh pages from an anonymous mapping (a heap allocation may reuse pages already resident), every one written
    block = mmap.mmap(-1, 256 << 20)
    chunk = b"\x01" * (1 << 20)
    for _ in range(256):
        block.write(chunk)
    during = peak_rss_mib()
    assert during >= before + 200
    block.close()                                     # unmapped: the pages leave the resident set
    assert reset_peak_rss()
    after = peak_rss_mib()
    assert after <= during - 200                      # the reset forgot the freed block's pages
    assert abs(after - _vm_rss_mib()) < 64

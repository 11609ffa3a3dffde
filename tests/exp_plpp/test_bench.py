"""exp_plpp/bench.py end to end on a tiny setting (random CLIP-B/16 text tower: no offline data needed): every
method gets a row of each metric, CoOp's within-round ratio to itself is exactly 1, the median ratio lies in its
range over rounds, and the memory ratio is the quotient of the logged peaks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.results import read_run, run_dirs
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[2]


def test_bench_rows_are_consistent(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "exp_plpp" / "bench.py"), "--backbones", "clip_b16_text",
                           "--classes", "3", "--batch", "4", "--steps", "1", "--repeats", "3", "--threads", "1"],
                          cwd=REPO, env=subprocess_env(LLM4ALL_RESULTS=str(tmp_path)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = read_run(run_dirs(tmp_path)[0])[1]
    got = {(r["method"], r["metric"]): r["value"] for r in rows if r["table"] == "plpp_bench"}
    methods = {"coop", "coop_plpp", "coop_plpp_fullvocab"}
    metrics = {"seconds_per_step", "ratio_vs_coop", "ratio_vs_coop_low", "ratio_vs_coop_high",
               "ratio_memory_vs_coop", "peak_rss_delta_mib"}
    assert set(got) == {(m, k) for m in methods for k in metrics}
    assert got[("coop", "ratio_vs_coop")] == got[("coop", "ratio_vs_coop_low")] == 1.0
    for m in methods:
        assert got[(m, "ratio_vs_coop_low")] <= got[(m, "ratio_vs_coop")] <= got[(m, "ratio_vs_coop_high")]
        assert got[(m, "seconds_per_step")] > 0
        if got[("coop", "peak_rss_delta_mib")] > 0:   # else the ratio is logged as NaN
            assert got[(m, "ratio_memory_vs_coop")] == pytest.approx(
                got[(m, "peak_rss_delta_mib")] / got[("coop", "peak_rss_delta_mib")])

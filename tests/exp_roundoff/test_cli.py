"""exp_roundoff/run.py as a command: an empty data root ends in one line on stderr and exit 2 (as the other
experiments), not a traceback."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import PYTHON, REPO, subprocess_env


@pytest.mark.parametrize("stage", [None, "train"])
def test_empty_data_root_is_one_line_exit_2(tmp_path, stage):
    empty = tmp_path / "data"
    empty.mkdir()
    cmd = [PYTHON, "exp_roundoff/run.py", "--profile", "quick", *(["--stage", stage] if stage else [])]
    env = subprocess_env(LLM4ALL_DATA=str(empty), LLM4ALL_RESULTS=str(tmp_path / "results"),
                         LLM4ALL_OUTPUTS=str(tmp_path / "outputs"))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: corpus file not found"), p.stderr
    assert "Traceback" not in p.stderr + p.stdout

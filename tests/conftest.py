"""Shared pytest fixtures. Tests never write into the real results/ or outputs/ (LLM4ALL_RESULTS/OUTPUTS -> tmp)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SESSION_DATA_ROOT = os.environ.get("LLM4ALL_DATA")  # as the test run was started (the Makefile sets it)


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LLM4ALL_RESULTS", str(tmp_path_factory.mktemp("results")))
    monkeypatch.setenv("LLM4ALL_OUTPUTS", str(tmp_path_factory.mktemp("outputs")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # `--data-dir` exports LLM4ALL_DATA for the run's subprocesses; a test that passes a fake data dir
    # must not leak it into the next test
    saved = SESSION_DATA_ROOT
    if saved is not None:  # a leak from an earlier test or fixture must not reach this one either
        os.environ["LLM4ALL_DATA"] = saved
    yield
    if saved is None:
        os.environ.pop("LLM4ALL_DATA", None)
    else:
        os.environ["LLM4ALL_DATA"] = saved


@pytest.fixture(scope="session")
def data_root() -> Path:
    from common.config import default_data_dir

    root = default_data_dir()
    if root is None:
        pytest.skip("offline data root not found: set LLM4ALL_DATA or provide ../shared/data")
    return root


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def rows_with_world(root: Path) -> list[dict]:
    """Every row of the results table under ``root / "results"``, each with its run's world size (``_world``,
    from the run manifest): multi-process tests assert that the rows came from the world they launched."""
    from common.results import read_run, run_dirs

    out = []
    for d in run_dirs(root / "results"):
        manifest, rows = read_run(d)
        out += [{**r, "_world": manifest.get("world_size")} for r in rows]
    return out

"""Every experiment's command line: ``--help`` keeps the usage examples and says how to list the config keys;
``--show-config`` prints the resolved config and exits without running or writing anything."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import PYTHON, REPO, subprocess_env

RUN_SCRIPTS = sorted(REPO.glob("exp_*/run.py"))


def _usage_examples(script: Path) -> list[str]:
    """The docstring's example command lines (indented ``python …`` / ``accelerate …``)."""
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8")), clean=False) or ""
    return [line for line in doc.splitlines() if line.lstrip().startswith(("python ", "accelerate "))]


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(script.relative_to(REPO)), *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def _written() -> list[str]:
    """Everything under the (per-test) results and outputs roots."""
    roots = [Path(os.environ["LLM4ALL_RESULTS"]), Path(os.environ["LLM4ALL_OUTPUTS"])]
    return [str(p) for root in roots if root.exists() for p in root.rglob("*")]


@pytest.mark.parametrize("script", RUN_SCRIPTS, ids=lambda p: p.parent.name)
def test_help_keeps_examples_and_names_show_config(script):
    examples = _usage_examples(script)
    assert examples, f"{script}: the docstring has no usage example"
    r = _run(script, "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    missing = [line for line in examples if line not in out]  # each example on its own line, unwrapped
    assert not missing, f"--help lost usage lines: {missing}"
    assert "--show-config lists every key" in r.stdout
    assert _written() == []


@pytest.mark.parametrize("script", RUN_SCRIPTS, ids=lambda p: p.parent.name)
def test_show_config_prints_the_resolved_config_and_runs_nothing(script):
    import importlib

    from common.config import build_config, to_dict

    r = _run(script, "--show-config", "seed=7")
    assert r.returncode == 0, r.stderr
    module = importlib.import_module(f"{script.parent.name}.config")
    # JSON round trip: tuples in dataclass defaults print as YAML lists
    cfg = build_config(module.Config, "quick", ["seed=7"], config_dir=script.parent / "configs")
    expected = json.loads(json.dumps(to_dict(cfg)))
    shown = yaml.safe_load(r.stdout)
    for d in (expected, shown):
        d.pop("outputs_dir", None)  # resolved against --outputs-dir / $LLM4ALL_OUTPUTS, not part of the check
    assert shown == expected and shown["seed"] == 7
    assert _written() == []

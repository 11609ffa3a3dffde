"""Triton kernels == PyTorch reference, under the Triton CPU interpreter.

The cases live in ``triton_cases.py`` and run in a fresh subprocess with ``TRITON_INTERPRET=1``: the flag
is read when a ``@triton.jit`` function is defined, so it must be set before ``common.lowp.triton_kernels``
is first imported, which only a new process guarantees inside a larger pytest session.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import PYTHON, REPO, subprocess_env

pytest.importorskip("triton")


def test_triton_kernels_match_reference_in_interpreter():
    proc = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(REPO / "tests/lowp/triton_cases.py")],
        cwd=REPO, env=subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]

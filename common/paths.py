"""One place for the repository's paths and environment decisions.

Every root is an environment variable with a default next to the repository, so that a run, its child
processes (accelerate launch, forkservers) and the tests resolve the same folders:

| root          | variable          | default                                  |
|---------------|-------------------|------------------------------------------|
| repository    | —                 | the folder holding ``common/``            |
| offline data  | ``LLM4ALL_DATA``    | ``../shared/data`` beside the repository, if it exists |
| results table | ``LLM4ALL_RESULTS`` | ``<repo>/results``                        |
| stage outputs | ``LLM4ALL_OUTPUTS`` | ``<repo>/outputs``                        |
| model cache   | ``LLM4ALL_CACHE``   | ``<repo>/.cache``                         |

``hub_offline()`` is the one reading of ``HF_HUB_OFFLINE``; nothing in the repository sets it (the
Makefile exports it for ``make reproduce``; direct script calls use the hub when the user has it).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else None


def data_dir() -> Path | None:
    """The offline data root: ``$LLM4ALL_DATA``, else ``../shared/data`` beside the repository, else None."""
    env = _env_path("LLM4ALL_DATA")
    if env is not None:
        return env
    guess = REPO_ROOT.parent / "shared" / "data"
    return guess.resolve() if guess.is_dir() else None


def results_dir() -> Path:
    """The results table's root (``runs/``, ``results.csv``, ``figures/``, ``REPORT.md``)."""
    return _env_path("LLM4ALL_RESULTS") or REPO_ROOT / "results"


def outputs_dir() -> Path:
    """The root of stage outputs (``<root>/<experiment>/<stage>/<hash>/``); git-ignored by default."""
    return _env_path("LLM4ALL_OUTPUTS") or REPO_ROOT / "outputs"


def cache_dir() -> Path:
    """Converted models and generated lm-eval task files (``$LLM4ALL_CACHE`` or ``<repo>/.cache``)."""
    return _env_path("LLM4ALL_CACHE") or REPO_ROOT / ".cache"


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE`` set to 1/true/yes)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it, else its name only: records never carry
    an absolute path of the machine that wrote them."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return p.name


def relative_argv(argv: list[str]) -> list[str]:
    """A command line with absolute paths made repo-relative (also inside ``key=/abs/path`` arguments)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and value.startswith("/"):
            out.append(f"{key}={repo_relative(value)}")
        elif arg.startswith("/"):
            out.append(repo_relative(arg))
        else:
            out.append(arg)
    return out

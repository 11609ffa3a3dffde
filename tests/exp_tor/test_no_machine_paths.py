"""No machine-specific path in exp_tor's code, docs and configs (nor in these tests).

Flagged: absolute POSIX paths (``/x/y``, or a known root such as home, tmp, work, Users), Windows drive
paths (drive letter, colon, backslash), home-relative paths (tilde, slash) and ``../`` references that
leave the repository or name a file the repository does not have (a checkout elsewhere has no such sibling
folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

SCANNED = [REPO / "exp_tor", REPO / "tests" / "exp_tor"]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".json"}

_ROOTS = "|".join(("home", "work", "tmp", "Users", "root", "mnt", "opt", "var", "usr", "srv", "scratch", "data",
                   "path", "private", "Volumes"))
# a slash not preceded by a word character, a dot, a bracket or another slash/colon (so not a ratio such as
# τ/(τ+δ), an URL or a relative a/b path); the character class is written so this line does not match itself
_LEAD = r"(?<![\w.)\]}<>~:/\\`'\"-])"   # (<, >: placeholders such as <outputs>/exp_tor)
ABSOLUTE = re.compile(_LEAD + r"/(?:(?:" + _ROOTS + r")\b|[A-Za-z_][\w.-]*/[\w.-])")
WINDOWS = re.compile(r"\b[A-Za-z]:\\\\?[A-Za-z]")
HOME = re.compile(r"(?<![\w])~/[\w.]")
PARENT = re.compile(r"(?:\.\./)+[\w./-]+")


def scanned_files() -> list[Path]:
    return sorted(p for root in SCANNED for p in root.rglob("*")
                  if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts)


def problems(path: Path, text: str | None = None) -> list[str]:
    """What is wrong in ``path`` (or in ``text`` as if it were that file)."""
    out = []
    text = path.read_text(encoding="utf-8") if text is None else text
    for lineno, line in enumerate(text.splitlines(), 1):
        for rx, why in ((ABSOLUTE, "absolute path"), (WINDOWS, "Windows path"), (HOME, "home-relative path")):
            out += [f"{path.relative_to(REPO)}:{lineno}: {why} {m.group(0)!r}" for m in rx.finditer(line)]
        for m in PARENT.finditer(line):
            target = (path.parent / m.group(0).split("#")[0].rstrip(".,;:)`")).resolve()
            if not target.is_relative_to(REPO) or not target.exists():
                out.append(f"{path.relative_to(REPO)}:{lineno}: '{m.group(0)}' is not a path inside this repository")
    return out


def test_scanner_flags_what_it_should():
    """The patterns catch the kinds of path this test is about and leave ratios and repo links alone."""
    bad = ["see /" + "home/me/x.csv", "under /" + "tmp", "file /" + "data/set.csv", "C:" + "\\Users\\me",
           "~" + "/notes.md", "../" + "shared/research/tor.md"]
    good = ["τ/(τ+δ)", "24 h/(nodes·rate)", "M_up·e^{R/M_up}", "[report](.." + "/results/REPORT.md#x)",
            "outputs/exp_tor/<stage>/<hash>/", "https://arxiv.org/abs/2410.21680", "1/rho - 1"]
    found = problems(REPO / "exp_tor" / "README.md", "\n".join(bad + good))
    assert [int(f.split(":")[1]) for f in found] == list(range(1, len(bad) + 1)), found


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_machine_path(path):
    assert not problems(path), "\n".join(problems(path))

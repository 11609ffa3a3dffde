"""Run every benchmark: ``common/lowp/bench.py`` (as a module) and each ``exp_*/bench.py``.

Benchmarks print ratios against a named peer measured in the same run and append rows to the results
table. They are separate from tests: tests assert correctness, never speed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    cmds = []
    if (REPO / "common" / "lowp" / "bench.py").is_file():
        cmds.append([sys.executable, "-m", "common.lowp.bench"])
    cmds += [[sys.executable, str(p)] for p in sorted(REPO.glob("exp_*/bench.py"))]
    if not cmds:
        print("no benchmark registered yet")
        return 0
    failed = 0
    for cmd in cmds:
        print(f"==> {' '.join(cmd[1:])}", flush=True)
        failed += subprocess.run(cmd, cwd=REPO).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

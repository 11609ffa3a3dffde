"""Run the registered benchmarks (``make bench``): each prints ratios against a named peer measured in
the same run and appends rows to the results table. Benchmarks are separate from tests: tests assert
correctness, never speed.

Registered: ``lowp`` (python -m common.lowp.bench), ``eval`` (python -m common.eval_bench: fast
multiple-choice backend vs lm-eval's HFLM), ``train`` (python -m common.train_bench: common.train vs
transformers' Trainer tokens/s, curriculum sampler overhead) and every ``exp_*/bench.py`` (named after its folder).

    python scripts/bench.py                      # all of them
    python scripts/bench.py --list               # names only
    python scripts/bench.py --only eval,exp_tor  # a subset
    python scripts/bench.py --only eval -- --questions 40 --threads 2   # arguments for the benchmark(s)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name -> module (python -m)
MODULES = {"lowp": "common.lowp.bench", "eval": "common.eval_bench", "train": "common.train_bench"}


def registered() -> dict[str, list[str]]:
    """name -> command line of every benchmark present in this checkout."""
    cmds = {name: [sys.executable, "-m", mod] for name, mod in MODULES.items()
            if (REPO / (mod.replace(".", "/") + ".py")).is_file()}
    for script in sorted(REPO.glob("exp_*/bench.py")):
        cmds[script.parent.name] = [sys.executable, str(script.relative_to(REPO))]
    return cmds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:  # everything after "--" goes to the selected benchmarks
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="NAMES",
                    help="comma-separated benchmark names to run (repeatable); default: all")
    ap.add_argument("--list", action="store_true", help="print the registered benchmark names and exit")
    args = ap.parse_args(argv)
    cmds = registered()
    if args.list:
        print("\n".join(cmds))
        return 0
    wanted = [n for item in args.only for n in item.split(",") if n] or list(cmds)
    unknown = [n for n in wanted if n not in cmds]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; registered: {', '.join(cmds)}")
    if not wanted:
        print("no benchmark registered yet")
        return 0
    failed = []
    for name in wanted:
        cmd = cmds[name] + extra
        print(f"==> [{name}] {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

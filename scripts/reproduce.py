"""Run every experiment's quick (or paper) profile, in a fixed order, then the figures.

    python scripts/reproduce.py [--profile quick] [--only exp_tor] [--launcher "accelerate launch"]

An experiment takes part when it has ``run.py`` and ``configs/<profile>.yaml``. Each run writes its
rows to the shared results table itself; this script only orders the runs and stops at the first failure.
Stages whose outputs are already complete for the same config are skipped (``common.stages``); pass
``--force`` to recompute everything.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common.paths import REPO_ROOT as REPO


def experiments(profile: str) -> list[Path]:
    return [p.parent for p in sorted(REPO.glob("exp_*/run.py")) if (p.parent / "configs" / f"{profile}.yaml").is_file()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="quick")
    p.add_argument("--only", default=None)
    p.add_argument("--launcher", default=sys.executable, help='e.g. "accelerate launch" for multi-GPU profiles')
    p.add_argument("--force", action="store_true", help="rerun every stage even where its outputs are complete")
    args = p.parse_args(argv)
    exps = [e for e in experiments(args.profile) if args.only in (None, e.name)]
    if not exps:
        print(f"no experiment is registered yet for profile '{args.profile}' "
              "(an experiment registers by having exp_<name>/run.py and configs/<profile>.yaml)")
        return 0
    for k, exp in enumerate(exps, 1):
        cmd = [*shlex.split(args.launcher), str(exp.relative_to(REPO) / "run.py"), "--profile", args.profile,
               *(["--force"] if args.force else [])]
        print(f"==> experiment {k}/{len(exps)} {exp.name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.run(cmd, cwd=REPO).returncode
        print(f"<== {exp.name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

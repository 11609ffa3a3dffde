"""Compare the rows of two results tables: did a code change move any number?

    python scripts/compare_results.py NEW_RESULTS_DIR [--against results] [--experiment exp_tor]
        [--rtol 1e-9] [--ignore-table stage_time --ignore-table tor_harness]

Rows are matched on (experiment, table, method, metric, params, seed), keeping each table's latest row
per key (``common.results.latest_rows``). Prints rows missing on either side and values that differ
beyond ``rtol``; exits 1 when anything differs, 0 when every shared key agrees and none is missing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from common.paths import results_dir
from common.results import latest_rows, load_results

KEY = ["experiment", "table", "method", "metric", "params", "seed"]


def _table(root: Path, experiment: str | None, ignore: list[str]):
    df = latest_rows(load_results(root, expand_params=False))
    if experiment:
        df = df[df["experiment"] == experiment]
    df = df[~df["table"].isin(ignore)]
    df = df.assign(seed=df["seed"].astype("string").fillna(""))
    return df.set_index(KEY)


def _close(a: float, b: float, rtol: float) -> bool:
    if (a is None or (isinstance(a, float) and math.isnan(a))) and (b is None or (isinstance(b, float)
                                                                                  and math.isnan(b))):
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=0.0)
    except (TypeError, ValueError):
        return a == b


def compare(new_root: Path, old_root: Path, experiment: str | None = None, rtol: float = 1e-9,
            ignore: list[str] | None = None) -> dict[str, list]:
    """{"missing_new": keys only in old, "missing_old": keys only in new, "differ": (key, old, new)}."""
    ignore = ignore or []
    new, old = _table(new_root, experiment, ignore), _table(old_root, experiment, ignore)
    shared = new.index.intersection(old.index)
    differ = [(k, old.at[k, "value"], new.at[k, "value"]) for k in shared
              if not _close(old.at[k, "value"], new.at[k, "value"], rtol)]
    return {"missing_new": sorted(old.index.difference(new.index)), "missing_old": sorted(new.index.difference(
        old.index)), "differ": differ, "n_shared": len(shared)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("new", type=Path, help="results root of the new run (holding results.csv)")
    p.add_argument("--against", type=Path, default=None, help="results root to compare with (default: results/)")
    p.add_argument("--experiment", default=None)
    p.add_argument("--rtol", type=float, default=1e-9)
    p.add_argument("--ignore-table", action="append", default=["stage_time"])
    args = p.parse_args(argv)
    out = compare(args.new, args.against or results_dir(), args.experiment, args.rtol, args.ignore_table)
    for name in ("missing_new", "missing_old"):
        for k in out[name][:50]:
            print(f"{name}: {k}")
    for k, a, b in out["differ"][:100]:
        print(f"differ: {k}: {a!r} -> {b!r}")
    print(f"{out['n_shared']} shared rows; {len(out['differ'])} differ; {len(out['missing_new'])} missing in new; "
          f"{len(out['missing_old'])} new only")
    return int(bool(out["differ"] or out["missing_new"] or out["missing_old"]))


if __name__ == "__main__":
    sys.exit(main())

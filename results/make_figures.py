"""Regenerate every registered figure from results/results.csv.

    python results/make_figures.py [--results-dir DIR] [--only exp_tor]

Each ``exp_*/figures.py`` registers its figure functions with ``common.plotting.register_figure``; this
script imports them all, regenerates ``results.csv`` from the record files, and writes
``<results>/figures/<experiment>/<name>.png``. With no rows it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def discover_figure_modules() -> list[str]:
    mods = []
    for path in sorted(REPO.glob("exp_*/figures.py")):
        name = f"{path.parent.name}.figures"
        importlib.import_module(name)
        mods.append(name)
    return mods


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", default=None)
    p.add_argument("--only", default=None, help="only this experiment's figures")
    args = p.parse_args(argv)
    if args.results_dir:
        os.environ["LLM4ALL_RESULTS"] = str(Path(args.results_dir).resolve())

    import matplotlib.pyplot as plt

    from common.plotting import FIGURES, style
    from common.results import CorruptRecordError, latest_rows, load_results, regenerate_csv, results_dir

    root = results_dir()
    modules = discover_figure_modules()
    try:
        regenerate_csv(root)
    except CorruptRecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    df = latest_rows(load_results(root))
    if df.empty:
        print(f"no result rows in {root / 'results.csv'} yet: nothing to plot "
              f"({len(FIGURES)} figure(s) registered by {len(modules)} experiment module(s)).")
        return 0
    style()
    failures, written = 0, 0
    for key, spec in sorted(FIGURES.items()):
        if args.only and spec.experiment != args.only:
            continue
        rows = df[df["experiment"] == spec.experiment].dropna(axis=1, how="all")
        if rows.empty:
            print(f"skip {key}: no rows for {spec.experiment}")
            continue
        try:
            fig = spec.func(rows)
        except Exception:
            failures += 1
            print(f"FAILED {key}:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        if fig is None:
            print(f"skip {key}: the rows it needs are absent")
            continue
        out = root / "figures" / spec.experiment / f"{spec.name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(out)
        written += 1
        print(f"wrote {out.relative_to(root.parent) if root.parent in out.parents else out}")
    print(f"{written} figure(s) written, {failures} failed, from {len(df)} result rows")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())

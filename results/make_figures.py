"""Regenerate every registered figure and the report from results/results.csv.

    python results/make_figures.py [--results-dir DIR] [--only exp_tor] [--no-figures]

Each ``exp_*/figures.py`` (and ``common/*/figures.py``) registers figure functions with
``common.plotting.register_figure`` and report tables with ``common.report.register_table``; this script
imports them all, regenerates ``results.csv`` from the record files, writes
``<results>/figures/<experiment>/<name>.png`` and ``<results>/REPORT.md`` (tables, figure links, the slide
deck's items in order, provenance). ``--only`` redraws one experiment's figures and leaves the report
alone (a report needs every experiment); ``--no-figures`` writes the report only, linking the figures
already on disk. With no rows it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def discover_figure_modules() -> list[str]:
    mods = []
    for path in sorted([*REPO.glob("exp_*/figures.py"), *REPO.glob("common/*/figures.py")]):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        importlib.import_module(name)
        mods.append(name)
    return mods


def _load_rows(root: Path, tries: int = 5):
    """Latest rows of results.csv; retried briefly: a concurrent migration may replace the table."""
    from pandas.errors import EmptyDataError

    from common.results import latest_rows, load_results

    for i in range(tries):
        try:
            return latest_rows(load_results(root))
        except (FileNotFoundError, EmptyDataError):
            if i == tries - 1:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def draw_figures(df, root: Path, only: str | None = None) -> dict[str, str]:
    """Draw every registered figure (of ``only``'s experiment, if given); key -> written/skipped/failed."""
    import matplotlib.pyplot as plt

    from common.plotting import FIGURES, style

    style()
    status: dict[str, str] = {}
    for key, spec in sorted(FIGURES.items()):
        if only and spec.experiment != only:
            continue
        rows = df[df["experiment"] == spec.experiment].dropna(axis=1, how="all")
        if rows.empty:
            print(f"skip {key}: no rows for {spec.experiment}")
            status[key] = "skipped"
            continue
        try:
            fig = spec.func(rows)
        except Exception:
            status[key] = "failed"
            print(f"FAILED {key}:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        if fig is None:
            print(f"skip {key}: the rows it needs are absent")
            status[key] = "skipped"
            continue
        out = root / "figures" / spec.experiment / f"{spec.name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(out)
        status[key] = "written"
        print(f"wrote {out.relative_to(root.parent) if root.parent in out.parents else out}")
    return status


def figures_on_disk(root: Path) -> dict[str, str]:
    from common.plotting import FIGURES

    return {key: "written" if (root / "figures" / s.experiment / f"{s.name}.png").is_file() else "skipped"
            for key, s in FIGURES.items()}


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", default=None)
    p.add_argument("--only", default=None, help="only this experiment's figures (the report is not rewritten)")
    p.add_argument("--no-figures", action="store_true", help="write REPORT.md only (links figures on disk)")
    args = p.parse_args(argv)
    if args.results_dir:
        os.environ["LLM4ALL_RESULTS"] = str(Path(args.results_dir).resolve())

    from common.plotting import FIGURES
    from common.report import TABLES, write_report
    from common.results import CorruptRecordError, regenerate_csv, results_dir

    root = results_dir()
    modules = discover_figure_modules()
    try:
        regenerate_csv(root)
    except CorruptRecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    df = _load_rows(root)
    if df.empty:
        print(f"no result rows in {root / 'results.csv'} yet: nothing to plot "
              f"({len(FIGURES)} figure(s), {len(TABLES)} table(s) registered by {len(modules)} module(s)).")
        return 0
    status = figures_on_disk(root) if args.no_figures else draw_figures(df, root, args.only)
    failed = sorted(k for k, v in status.items() if v == "failed")
    if not args.no_figures:
        print(f"{sum(v == 'written' for v in status.values())} figure(s) written, {len(failed)} failed, "
              f"from {len(df)} result rows")
    if args.only:
        print("report not rewritten (--only); run without --only to regenerate REPORT.md")
        return 1 if failed else 0
    path, table_failures = write_report(root, df, status)
    for f in table_failures:
        print(f"FAILED table {f}", file=sys.stderr)
    print(f"wrote {path.relative_to(root.parent) if root.parent in path.parents else path} "
          f"({len(TABLES)} registered table(s), {len(table_failures)} failed)")
    return 1 if failed or table_failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())

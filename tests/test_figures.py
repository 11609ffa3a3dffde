"""results/make_figures.py and scripts/reproduce.py with and without rows/experiments."""

from __future__ import annotations

import subprocess

from common.plotting import FIGURES, register_figure
from common.report import build_report
from common.results import Run, latest_rows, load_results
from tests.conftest import PYTHON, REPO, subprocess_env


def test_make_figures_with_no_rows_exits_0(tmp_path):
    proc = subprocess.run([PYTHON, str(REPO / "results" / "make_figures.py"), "--results-dir", str(tmp_path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no result rows" in proc.stdout


def test_registered_figure_is_drawn_from_rows(tmp_path, monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("make_figures", REPO / "results" / "make_figures.py")
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    monkeypatch.setattr(mf, "discover_figure_modules", lambda: [])
    monkeypatch.setitem(sys.modules, "make_figures", mf)

    @register_figure("toy_curve", experiment="exp_toy")
    def toy_curve(df):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot(df["p.x"], df["value"], "o-")
        return fig

    try:
        run = Run("exp_toy", root=tmp_path)
        for x in range(3):
            run.log(table="fig", method="m", metric="y", value=x * x, params={"x": x})
        assert mf.main(["--results-dir", str(tmp_path), "--only", "exp_toy"]) == 0
        png = tmp_path / "figures" / "exp_toy" / "toy_curve.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
        assert not (tmp_path / "REPORT.md").exists()  # --only redraws figures, never a partial report
        assert mf.main(["--results-dir", str(tmp_path)]) == 0
        report = (tmp_path / "REPORT.md").read_text()
        assert "![toy curve](figures/exp_toy/toy_curve.png)" in report
        assert f"run `{run.run_id}`" in report and "Source: `fig`" in report
        assert report == build_report(latest_rows(load_results(tmp_path)), {"exp_toy/toy_curve": "written"})
    finally:
        FIGURES.pop("exp_toy/toy_curve", None)


def test_reproduce_reports_missing_profile():
    proc = subprocess.run([PYTHON, str(REPO / "scripts" / "reproduce.py"), "--profile", "no_such_profile"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "no experiment is registered yet" in proc.stdout

"""results/REPORT.md (common.report): every number in it comes from results.csv, the output is deterministic,
and synthetic rows give the expected tables and "not yet reproduced" entries.

The number check is independent of the report's own formatter: it re-implements the documented rule
(integers in full, otherwise four significant digits) and compares parsed floats.
"""

from __future__ import annotations

import importlib
import json
import math
import re

import pandas as pd
import pytest

from common.plotting import FIGURES, register_figure
from common.report import DECK, TABLES, build_report, fmt_cell, fmt_number, pivot, register_table, render_report
from common.results import Run, latest_rows, load_results
from tests.conftest import REPO

# Documented exceptions (common/report.py docstring): provenance lines and columns, and column headers.
PROVENANCE_COLUMNS = {"run", "commit", "device", "started", "uncommitted changes"}
SOURCE_PREFIX = "Source:"
NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?%?$")
SPLIT = re.compile(r"[\s|()\[\]{},;:*`=/<>\"'!?±×]+")


def _import_experiment_figures() -> None:
    for path in sorted(REPO.glob("exp_*/figures.py")):
        importlib.import_module(f"{path.parent.name}.figures")


def _rule(v: float) -> float:
    """The documented number rule, written here independently of common.report.fmt_number."""
    v = float(v)
    if v == int(v) and abs(v) < 1e15:
        return float(int(v))
    return float(f"{v:.4g}")


def _numeric_tokens(text: str) -> list[str]:
    return [t for t in SPLIT.split(text) if NUMBER.match(t)]


def allowed_numbers(df: pd.DataFrame) -> set[float]:
    """Every number of results.csv, formatted by the rule: value, stderr, n, seed, numeric params, and the
    numbers written inside its string fields (method names, string params, ...)."""
    out: set[float] = set()

    def add(x) -> None:
        if isinstance(x, bool) or x is None:
            return
        if isinstance(x, (int, float)) and math.isfinite(float(x)):
            out.add(_rule(x))
        elif isinstance(x, str):
            out.update(float(t.rstrip("%")) for t in _numeric_tokens(x))

    for col in ("value", "stderr", "n", "seed"):
        for x in df[col].dropna():
            add(float(x))
    for col in ("table", "method", "metric"):
        for x in df[col].dropna().unique():
            add(str(x))
    for raw in df["params"].dropna().unique():
        for x in json.loads(raw).values():
            add(x)
    return out


def stray_numbers(report: str, allowed: set[float]) -> list[str]:
    """Numeric tokens of the report (outside the documented provenance context) not in ``allowed``."""
    bad, header = [], None
    for line in report.splitlines():
        if line.startswith(SOURCE_PREFIX):
            header = None
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip()[1:-1].split(" | ")]
            if header is None:
                header = cells  # column names are headers, not results
                continue
            if set(line) <= set("|-: "):
                continue
            texts = [c for h, c in zip(header, cells) if h not in PROVENANCE_COLUMNS]
        else:
            header, texts = None, [line]
        for text in texts:
            for tok in _numeric_tokens(text):
                if float(tok.rstrip("%")) not in allowed:
                    bad.append(f"{tok!r} in: {line[:160]}")
    return bad


@pytest.fixture(scope="module")
def repo_rows() -> pd.DataFrame:
    root = REPO / "results"
    if not (root / "results.csv").is_file():
        pytest.skip("no results/results.csv in this checkout")
    return load_results(root)


@pytest.fixture(scope="module")
def repo_report(repo_rows) -> str:
    _import_experiment_figures()
    report, failures = render_report(latest_rows(repo_rows))
    assert not failures
    return report


def test_every_number_of_the_report_is_in_results_csv(repo_rows, repo_report, tmp_path):
    report = repo_report
    (tmp_path / "REPORT.md").write_text(report)
    bad = stray_numbers(report, allowed_numbers(repo_rows))
    assert not bad, f"{len(bad)} number(s) in the report are not in results.csv:\n" + "\n".join(bad[:20])
    # the check itself can fail: a typed number is caught, in a table cell and in prose
    assert stray_numbers(report + "\n| x | 3.14159 |\n|---|---|\n| a | 2.71828 |\n", allowed_numbers(repo_rows))
    assert stray_numbers("the bound reaches 6e6 at depth 8.", allowed_numbers(repo_rows))
    # and it is not vacuous: the report holds many numbers
    assert len(_numeric_tokens(report)) > 1000


def test_report_is_deterministic_and_independent_of_row_order(repo_rows, repo_report):
    shuffled = latest_rows(repo_rows).sample(frac=1.0, random_state=0)
    assert build_report(shuffled) == repo_report


def test_fmt_number_rule():
    assert fmt_number(2.3571949) == "2.357"
    assert fmt_number(1000.0) == "1000" and fmt_number(12267) == "12267"
    assert fmt_number(4236162.3) == "4.236e+06"
    assert fmt_number(0.000123456) == "0.0001235"
    assert fmt_number(float("nan")) == "—" and fmt_number(None) == "—"
    assert fmt_number(-0.0) == "0"


def test_pivot_never_averages():
    rows = pd.DataFrame({"method": ["a", "a"], "metric": ["loss", "loss"], "value": [1.0, 2.0]})
    with pytest.raises(ValueError, match="never averages"):
        pivot(rows, index=["method"])
    rows["seed"] = [0, 1]
    w = pivot(rows, index=["method", "seed"])
    assert w["loss"].tolist() == [1.0, 2.0]


def _section(report: str, anchor: str) -> str:
    start = report.index(f'<a id="{anchor}"></a>')
    nxt = report.find("<a id=", start + 1)
    return report[start:nxt if nxt > 0 else None]


def test_synthetic_rows_give_expected_tables_and_deck_entries(tmp_path):
    _import_experiment_figures()
    run = Run("exp_tor", config={"x": 1}, seed=0, profile="quick", root=tmp_path)
    for metric, value in {"tokens_b": 26.0, "days": 0.13061, "cost_usd": 1003.086, "mtbf_h": 230.77,
                          "tor": 0.98731, "days_with_failures": 0.1323, "cost_with_failures": 1015.977}.items():
        run.log(table="tor_cost_table", method="planning", metric=metric, value=value,
                params={"model": "GPT-1.3B", "gpus": 128})
    run.finish()
    ro = Run("exp_roundoff", config={}, seed=0, profile="paper", root=tmp_path)
    for seed, loss in enumerate([2.34, 2.37]):
        ro.log(table="mixed_precision_training", method="fp32", metric="val_loss", value=loss, seed=seed,
               params={"steps": 150})
    ro.log(table="mixed_precision_training", method="fp32", metric="val_loss_mean", value=2.355, stderr=0.015,
           n=2, params={"steps": 150})
    ro.finish()

    @register_table("toy", experiment="exp_toy_report", title="Toy table", sources="toy_rows", deck="d4")
    def toy(rows):
        return None  # rows absent: the deck entry must stay "not yet reproduced"

    try:
        df = latest_rows(load_results(tmp_path))
        report, failures = render_report(df)
    finally:
        TABLES.pop("exp_toy_report/toy")

    assert not failures
    cost = _section(report, "table-exp_tor-cost_table")
    assert ("| model | GPUs | tokens (B) | days | cost (USD) | MTBF (h) | TOR | days_with_failures | "
            "cost_with_failures |") in cost
    assert "| GPT-1.3B | 128 | 26 | 0.1306 | 1003 | 230.8 | 0.9873 | 0.1323 | 1016 |" in cost
    assert f"commit `{df['git_commit'].iloc[0][:7]}`" in cost and "profile quick (smoke test)" in cost
    mp = _section(report, "table-exp_roundoff-mixed_precision_training")
    assert "| fp32 | 2.355 ± 0.015 | 2 | 2.34 | 2.37 |" in mp and "profile paper" in mp
    assert "The rows this table needs are not in `results.csv` yet." in _section(report, "table-exp_tor-tor_validation")

    deck = _section(report, "deck")
    lines = {item.key: next(line for line in deck.splitlines() if line.startswith(f"| {fmt_cell(item.title)} |"))
             for item in DECK}
    assert "(#table-exp_tor-cost_table)" in lines["training_costs"]
    assert "(#table-exp_roundoff-mixed_precision_training)" in lines["mixed_precision"]
    for key in ("d4", "curriculum", "diversity", "askllm", "info_density"):
        assert "not yet reproduced" in lines[key], key
    # without study rows the deck names the study table and figures still to come
    assert "Curriculum study" in lines["d4"] and "Curriculum study" in lines["curriculum"]
    assert "Toy table (exp_toy_report): no rows yet" in lines["d4"]
    # the deck's order is kept
    order = [deck.index(lines[item.key]) for item in DECK]
    assert order == sorted(order)
    assert not stray_numbers(report, allowed_numbers(load_results(tmp_path)))


def test_figure_registration_carries_sources_and_deck():
    @register_figure("toy_fig", experiment="exp_toy_report", sources="toy_rows", deck=("d4",), title="Toy")
    def toy_fig(df):
        return None

    try:
        spec = FIGURES["exp_toy_report/toy_fig"]
        assert spec.sources == ("toy_rows",) and spec.deck == ("d4",) and spec.title == "Toy"
    finally:
        FIGURES.pop("exp_toy_report/toy_fig")


def test_committed_report_holds_only_results_numbers(repo_rows):
    path = REPO / "results" / "REPORT.md"
    if not path.is_file():
        pytest.skip("results/REPORT.md not generated yet (make figures)")
    bad = stray_numbers(path.read_text(), allowed_numbers(repo_rows))
    assert not bad, "results/REPORT.md is stale or holds typed numbers (run make figures):\n" + "\n".join(bad[:20])


def test_readme_links_into_the_report_resolve(repo_report):
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', repo_report))
    links = [(readme.relative_to(REPO), a) for readme in sorted(REPO.glob("**/README.md"))
             if ".venv" not in readme.parts for a in re.findall(r"REPORT\.md#([\w\-]+)", readme.read_text())]
    assert [x for x in links if x[1] not in anchors] == []
    internal = re.findall(r"\]\(#([\w\-]+)\)", repo_report)
    assert internal and set(internal) <= anchors

"""The cost table's per-run lines (exp_distill_data.figures._per_run_cost) on hand-made rows: the latest small run
that logged each kind of run, its slowest run and highest peak, ablations left out."""

from __future__ import annotations

import pandas as pd

from exp_distill_data.figures import _per_run_cost


def _row(run: str, end: str, stage: str, method: str, metric: str, value: float, model: str,
         profile: str = "small") -> dict:
    key = "p.distiller" if stage == "distill" else "p.trainer"
    return {"experiment": "exp_distill_data", "table": "distill_run_time", "method": method, "metric": metric,
            "value": value, "run_id": run, "end_time": end, "profile": profile, "p.stage": stage, key: model}


def test_per_run_cost_takes_each_kinds_latest_run_and_its_worst_case():
    rows = pd.DataFrame([
        _row("old", "2026-01-01", "train", "full", "seconds", 100.0, "opt"),       # only the old run has full
        _row("old", "2026-01-01", "train", "random", "seconds", 9.0, "opt"),
        _row("new", "2026-01-02", "train", "random", "seconds", 2.0, "opt"),       # the newer run wins
        _row("new", "2026-01-02", "train", "random", "seconds", 3.0, "opt"),
        _row("new", "2026-01-02", "distill", "ours", "seconds", 40.0, "opt"),
        _row("new", "2026-01-02", "distill", "ours", "peak_rss_mib", 700.0, "opt"),
        _row("new", "2026-01-02", "distill", "ours", "peak_rss_mib", 650.0, "opt"),
        _row("new", "2026-01-02", "distill", "ours[init=random]", "seconds", 99.0, "opt"),   # an ablation
        _row("q", "2026-01-03", "train", "random", "seconds", 0.1, "opt", profile="quick"),  # not small
    ])
    out = _per_run_cost(rows).set_index("item")
    assert set(out.index) == {"train: full-data fine-tune (opt), one run", "train: random (opt), one run",
                              "distill: ours (opt), one run"}
    assert out.loc["train: full-data fine-tune (opt), one run", "run"] == "old"
    random = out.loc["train: random (opt), one run"]
    assert (random["run"], random["wall seconds"], random["runs"]) == ("new", 3.0, 2)
    ours = out.loc["distill: ours (opt), one run"]
    assert (ours["wall seconds"], ours["peak RSS MiB"], ours["runs"]) == (40.0, 700.0, 2)

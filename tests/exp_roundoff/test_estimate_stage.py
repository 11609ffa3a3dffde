"""Stage ``estimate``: the statistical estimate / measured error ratio across init std and depth on a tiny
config. Oracles: the measured error by numpy on the lockstep block outputs (test hooks), the ratio and the
range table recomputed from the rows by pandas."""

from __future__ import annotations

import matplotlib.figure
import numpy as np
import pytest

from common.report import TABLES
from common.results import load_results
from tests.exp_roundoff.test_authors_metrics import _HookedTracer

TINY = ["--profile", "quick", "--stage", "estimate", "estimate.archs=[gpt2,opt]", "estimate.init_stds=[0.02,0.3]",
        "estimate.depths=[1,2]", "estimate.n_inits=2", "estimate.d_model=16", "estimate.seq_len=8",
        "estimate.batch=1"]


def _rel_l2(doubled: np.ndarray) -> np.ndarray:
    n = doubled.shape[0] // 2
    ref = doubled[:n].reshape(-1, doubled.shape[-1])
    test = doubled[n:].reshape(-1, doubled.shape[-1])
    return np.linalg.norm(test - ref, axis=1) / np.linalg.norm(ref, axis=1)


def test_estimate_stage_rows_ratio_and_range(monkeypatch, capsys):
    import exp_roundoff.run as run

    monkeypatch.setattr(run, "Tracer", _HookedTracer)
    _HookedTracer.seen = []
    assert run.main(TINY) == 0
    out = capsys.readouterr().out
    assert "estimate 8/8 opt std=0.3 L=2" in out  # one progress line per (arch, std, depth)
    df = load_results()
    chk = df[df["table"] == "estimate_check"]
    assert set(chk["metric"]) == {"measured_mean", "estimate_mean", "ratio", "token_ratio_median"}
    assert len(chk) == 4 * 2 * 2 * 2
    # the traces in the stage's loop order: arch, std, depth, init (one precision)
    traces = iter(_HookedTracer.seen)
    for arch in ("gpt2", "opt"):
        for std in (0.02, 0.3):
            for depth in (1, 2):
                meas = np.concatenate([_rel_l2(next(traces)["outs"][depth - 1][0]) for _ in range(2)])
                g = chk[(chk["p.arch"] == arch) & (chk["p.init_std"] == std) & (chk["p.depth"] == depth)]
                v = g.set_index("metric")["value"]
                assert v["measured_mean"] == pytest.approx(meas.mean(), rel=1e-12), (arch, std, depth)
                assert v["ratio"] == pytest.approx(v["estimate_mean"] / v["measured_mean"], rel=1e-12)
                assert v["estimate_mean"] > 0 and g["n"].iloc[0] == meas.size
    # the range table: min / max over depths per arch, and over everything for arch "all"
    rng = df[df["table"] == "estimate_range"]
    ratio = chk[chk["metric"] == "ratio"]
    for std in (0.02, 0.3):
        for arch in ("gpt2", "opt", "all"):
            r = ratio[(ratio["p.init_std"] == std) & ((ratio["p.arch"] == arch) | (arch == "all"))]
            v = rng[(rng["p.init_std"] == std) & (rng["p.arch"] == arch)].set_index("metric")["value"]
            assert v["ratio_min"] == r["value"].min() and v["ratio_max"] == r["value"].max()
            assert v["depth_at_max"] == r.loc[r["value"].idxmax(), "p.depth"]
    # the report tables and the figure draw from these rows
    import exp_roundoff.figures as figs

    for name in ("estimate_check", "estimate_range"):
        got = TABLES[f"exp_roundoff/{name}"].func(df)
        assert got is not None and len(got[0]) == {"estimate_check": 8, "estimate_range": 6}[name]
    assert isinstance(figs.estimate_ratio(df[df["experiment"] == "exp_roundoff"]), matplotlib.figure.Figure)


def test_estimate_config_is_validated(capsys):
    from exp_roundoff.run import main

    assert main(["--profile", "quick", "--stage", "estimate", "estimate.archs=[bloom]"]) == 2
    assert "estimate.archs" in capsys.readouterr().err
    assert main(["--profile", "quick", "--stage", "estimate", "estimate.depths=[0]"]) == 2

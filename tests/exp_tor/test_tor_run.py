"""run.py / bench.py end to end on tiny sizes; config errors exit 2."""

import pytest

from common.results import load_results
from exp_tor import bench, run


def test_config_errors_exit_2(tmp_path):
    for argv in (["--profile", "quick", "sim.nope=1"], ["--profile", "quick", "stage=bogus"], ["--stage", "bogus"],
                 ["--profile", "quick", "planning.mfu=2"], ["--profile", "nosuch"]):
        with pytest.raises(SystemExit) as e:
            run.main(argv)
        assert e.value.code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("sim:\n  n_cycles: lots\n")
    with pytest.raises(SystemExit) as e:
        run.main(["--profile", str(bad)])
    assert e.value.code == 2


def test_tiny_run_writes_rows():
    assert run.main(["--profile", "quick", "--stage", "closed,simulate,planning", "sim.n_cycles=2000",
                     "sim.taus=[30.0]", "sim.mtbfs=[180.0]", "closed.curve_points=5"]) == 0
    df = load_results()
    df = df[df["experiment"] == "exp_tor"]
    tables = set(df["table"])
    assert {"tor_optimal_interval", "tor_vs_interval", "tor_breakdown", "tor_validation", "tor_fail_slow",
            "tor_cost_table", "tor_vs_cluster"} <= tables
    z = df[(df["table"] == "tor_validation") & (df["metric"] == "z_score")]["value"]
    assert len(z) == 3 and (z.abs() < 4).all()
    cost = df[(df["table"] == "tor_cost_table")]
    assert len(set(cost["p.model"])) == 6
    import exp_tor.figures  # noqa: F401
    from common.plotting import FIGURES
    for key in ("exp_tor/tor_vs_interval", "exp_tor/tor_vs_cluster", "exp_tor/sim_vs_closed"):
        assert FIGURES[key].func(df) is not None


def test_bench_tiny(capsys):
    assert bench.main(["--cycles", "20000", "--loop-cycles", "2000"]) == 0
    assert "speed-up" in capsys.readouterr().out
    df = load_results()
    assert set(df[df["table"] == "tor_bench"]["method"]) == {"vectorised", "python_loop", "vectorised_vs_python_loop"}


def test_trace_replay_via_run(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("time,kind\n50,fail_stop\n")
    args = ["--stage", "simulate", "sim.n_cycles=200", "sim.taus=[30.0]", "sim.mtbfs=[180.0]",
            f"sim.trace={trace}", "sim.trace_t_opt=100", "sim.trace_tau=30", "sim.trace_delta=1",
            "sim.trace_repair=10"]
    assert run.main(args) == 0
    df = load_results()
    row = df[(df["table"] == "tor_trace_replay") & (df["metric"] == "tor")]
    assert row["value"].iloc[0] == pytest.approx(100 / 132)
    trace.write_text("time,kind\n50,fail_stop\nabc,fail_stop\n")
    assert run.main(args) == 2


def test_harness_stage_via_run():
    """The harness stage end to end on a tiny job: real training, real SIGKILLs, rows in the table."""
    argv = ["--profile", "quick", "--stage", "harness",
            "harness.job.steps=60", "harness.job.checkpoint_every=20", "harness.job.mtbf_s=1.5",
            "harness.job.repair_s=0.1", "harness.job.slow_mtbf_s=1.0", "harness.job.slow_duration_s=0.3",
            "harness.job.n_seqs=256", "harness.sweep_intervals=[10,40]", "harness.sweep_steps=60",
            "harness.sweep_mtbf_s=1.0", "harness.sweep_fault_seeds=[1,2]", "harness.sweep_parallel=2"]
    assert run.main(argv) == 0
    df = load_results()
    v = df[df["table"] == "harness_validation"]
    tor = {m: float(v[(v["method"] == m) & (v["metric"] == "tor")]["value"].iloc[0])
           for m in ("observed", "closed_form", "simulator_replay")}
    assert all(0 < t <= 1 for t in tor.values())
    n_faults = v[(v["method"] == "estimate") & (v["metric"] == "mtbf_uptime")]["value"]
    assert len(n_faults) == 1
    opt = df[df["table"] == "harness_interval_optimum"]
    assert {"predicted_numeric_exact", "predicted_grid_best", "empirical_peak", "young", "daly"} <= set(opt["method"])
    gap = opt[opt["metric"] == "tor_shortfall"]
    assert len(gap) == 1 and gap["value"].iloc[0] >= 0 and gap["n"].iloc[0] == 2
    sweep = df[df["table"] == "harness_interval_sweep"]
    assert set(sweep["p.checkpoint_every"].dropna()) == {10, 40}
    observed = sweep[(sweep["method"] == "observed") & (sweep["metric"] == "tor")]
    assert len(observed) == 4 and set(observed["p.restart"]) == {"warm"}
    assert len(sweep[sweep["method"] == "predicted_pooled"]) == 2
    # the optimum rows are what the sweep rows say: empirical peak = argmax of the seed-mean observed TOR,
    # shortfall = its mean TOR minus that of the grid point nearest the prediction (paired over seeds)
    mean_tor = observed.groupby("p.checkpoint_every")["value"].mean()
    assert opt[opt["method"] == "empirical_peak"]["value"].iloc[0] == mean_tor.idxmax()
    nearest = int(gap["p.nearest_steps"].iloc[0])
    assert gap["value"].iloc[0] == pytest.approx(mean_tor.max() - mean_tor[nearest])
    pooled = sweep[sweep["method"] == "predicted_pooled"].set_index("p.checkpoint_every")["value"]
    assert opt[opt["method"] == "predicted_grid_best"]["value"].iloc[0] == pooled.idxmax()
    import exp_tor.figures  # noqa: F401
    from common.plotting import FIGURES
    for key in ("exp_tor/harness_rt", "exp_tor/harness_interval_sweep"):
        assert FIGURES[key].func(df) is not None

"""run.py / bench.py end to end on tiny sizes; config errors exit 2; stages on disk; one layer of defaults."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import to_dict
from common.results import load_results
from common.stages import Pipeline
from exp_tor import bench, run
from exp_tor.config import Config
from tests.conftest import REPO, subprocess_env

TINY = ["sim.n_cycles=1000", "sim.taus=[30.0]", "sim.mtbfs=[180.0]", "closed.curve_points=5"]


def exit_code(argv: list[str]) -> int:
    """run.main's exit code, whether returned (stage errors) or raised by the config parser."""
    try:
        return run.main(argv)
    except SystemExit as e:
        return e.code


def stage_dirs(stage: str) -> list[Path]:
    """The completed output folders of one stage under the test's outputs root."""
    root = Path(os.environ["LLM4ALL_OUTPUTS"]) / "exp_tor" / stage
    return sorted(p for p in root.glob("*") if (p / "COMPLETE.json").is_file()) if root.is_dir() else []


def test_config_errors_exit_2(tmp_path, capsys):
    for argv in (["--profile", "quick", "sim.nope=1"], ["--profile", "quick", "stage=bogus"], ["--stage", "bogus"],
                 ["--profile", "quick", "stages=[closed,bogus]"], ["--profile", "quick", "harness.work_dir=x"],
                 ["--profile", "quick", "planning.mfu=2"], ["--profile", "nosuch"]):
        assert exit_code(argv) == 2, argv
    assert "unknown stage(s) ['bogus']" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("sim:\n  n_cycles: lots\n")
    assert exit_code(["--profile", str(bad)]) == 2
    assert not (Path(os.environ["LLM4ALL_OUTPUTS"]) / "exp_tor").exists()   # nothing written before the checks


def _leaves(node: dict, prefix: str = ""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_profiles_hold_only_differences_from_the_defaults(profile):
    """One layer of defaults: every leaf of a profile YAML differs from the dataclass default (read here with
    plain yaml + dataclasses.asdict, independently of common.config)."""
    defaults = dataclasses.asdict(Config())
    data = yaml.safe_load((REPO / "exp_tor" / "configs" / f"{profile}.yaml").read_text())
    leaves = list(_leaves(data))
    assert leaves
    for key, value in leaves:
        default = defaults
        for part in key.split("."):
            assert isinstance(default, dict) and part in default, f"{profile}.yaml: {key} is not a config key"
            default = default[part]
        assert value != default, f"{profile}.yaml: {key} = {value!r} equals the dataclass default"


def test_stage_hashes_cover_only_their_config_keys():
    """Each stage's folder changes with its own section (and simulate with the seed) and nothing else."""
    p = Pipeline("exp_tor", run.STAGES)
    base = to_dict(Config())
    changes = {"seed": ("seed", 1), "closed": ("closed.delta", 6.0), "sim": ("sim.n_cycles", 1234),
               "planning": ("planning.mfu", 0.5), "harness": ("harness.sweep_steps", 10),
               "stages": ("stages", ["closed"]), "outputs_dir": ("outputs_dir", "elsewhere")}
    moved_by = {"closed": {"closed"}, "simulate": {"seed", "sim"}, "planning": {"planning"}, "harness": {"harness"}}
    for what, (key, value) in changes.items():
        d = json.loads(json.dumps(base))
        node = d
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
        for stage, keys in moved_by.items():
            assert (p.key(stage, d) != p.key(stage, base)) == (what in keys), (stage, key)


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
    # the summaries on disk say what the rows say
    closed = json.loads((stage_dirs("closed")[0] / "closed.json").read_text())
    daly = df[(df["table"] == "tor_optimal_interval") & (df["method"] == "daly") & (df["metric"] == "tau_opt")]
    assert sorted(closed["tau_opt"]["daly"]) == sorted(daly["value"])
    simulate = json.loads((stage_dirs("simulate")[0] / "simulate.json").read_text())
    assert simulate["max_abs_z"] == pytest.approx(z.abs().max()) and simulate["trace"] is None
    planning = json.loads((stage_dirs("planning")[0] / "planning.json").read_text())
    assert [r["model"] for r in planning["cost_table"]] == Config().planning.models
    assert stage_dirs("harness") == []
    import exp_tor.figures  # noqa: F401
    from common.plotting import FIGURES
    for key in ("exp_tor/tor_vs_interval", "exp_tor/tor_vs_cluster", "exp_tor/sim_vs_closed"):
        assert FIGURES[key].func(df) is not None


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "exp_tor" / "run.py"), "--profile", "quick", *args],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)


def test_stage_alone_in_a_fresh_process_then_skipped(capsys):
    assert run.main(["--profile", "quick", "--stage", "closed", *TINY]) == 0
    assert "stage 1/1 closed: running" in capsys.readouterr().out
    r = run_cli("--stage", "planning", *TINY)          # a fresh process
    assert r.returncode == 0, r.stderr
    assert "stage 1/1 planning: running" in r.stdout and "closed" not in r.stdout   # only what was selected
    assert len(stage_dirs("closed")) == len(stage_dirs("planning")) == 1 and stage_dirs("simulate") == []
    n_rows = load_results().groupby("table").size()
    assert n_rows["tor_cost_table"] == 42 and n_rows["tor_vs_cluster"] == 6 and "tor_validation" not in n_rows
    # the same call again: skipped, no new rows (stage_time rows are logged only for stages that ran)
    r = run_cli("--stage", "planning", *TINY)
    assert r.returncode == 0, r.stderr
    assert "stage 1/1 planning: skipped" in r.stdout and "planning: running" not in r.stdout
    again = load_results().groupby("table").size()
    assert again.drop("stage_time").equals(n_rows.drop("stage_time"))
    # a key of another stage does not move their folders: only simulate (new for seed=3) runs
    assert run.main(["--profile", "quick", *TINY, "seed=3", "stages=[closed,simulate,planning]"]) == 0
    out = capsys.readouterr().out
    assert "closed: skipped" in out and "planning: skipped" in out and "simulate: running" in out


def test_bench_tiny(capsys):
    assert bench.main(["--cycles", "20000", "--loop-cycles", "2000"]) == 0
    assert "speed-up" in capsys.readouterr().out
    df = load_results()
    assert set(df[df["table"] == "tor_bench"]["method"]) == {"vectorised", "python_loop", "vectorised_vs_python_loop"}


def test_trace_replay_via_run(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("time,kind\n50,fail_stop\n")
    args = ["--stage", "simulate", "sim.n_cycles=200", "sim.taus=[30.0]", "sim.mtbfs=[180.0]",
            f"sim.trace={trace}", "sim.trace_t_opt=100", "sim.trace_tau=30", "sim.trace_delta=1",
            "sim.trace_repair=10"]
    assert run.main(args) == 0
    df = load_results()
    row = df[(df["table"] == "tor_trace_replay") & (df["metric"] == "tor")]
    assert row["value"].iloc[0] == pytest.approx(100 / 132)
    summary = json.loads((stage_dirs("simulate")[0] / "simulate.json").read_text())
    assert summary["trace"]["file"] == "trace.csv" and summary["trace"]["tor"] == pytest.approx(100 / 132)
    # a bad line exits 2 naming file:line, although the simulate output for this config is complete
    trace.write_text("time,kind\n50,fail_stop\nabc,fail_stop\n")
    capsys.readouterr()
    assert run.main(args) == 2
    assert "trace.csv:3" in capsys.readouterr().err
    # an edited (valid) trace is not silently skipped: exit 2 until --force replays it
    trace.write_text("time,kind\n")
    assert run.main(args) == 2
    assert "changed since the simulate stage replayed it" in capsys.readouterr().err
    assert run.main(["--force", *args]) == 0   # (options before the overrides: argparse)
    row = load_results().query("table == 'tor_trace_replay' and metric == 'tor'")
    assert sorted(row["value"]) == pytest.approx([100 / 132, 100 / 103])   # no fault: 100 s of work + 3 saves


@pytest.mark.slow
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
    assert {"predicted_numeric_exact", "predicted_grid_best", "empirical_best_mean", "empirical_optimal_set",
            "young", "daly"} <= set(opt["method"])
    gap = opt[opt["metric"] == "tor_shortfall"]
    assert len(gap) == 1 and gap["value"].iloc[0] >= 0 and gap["n"].iloc[0] == 2
    if gap["p.nearest_steps"].iloc[0] == gap["p.empirical_best_mean_steps"].iloc[0]:
        assert gap["stderr"].isna().all()   # 0 by construction: no standard error of 0
    sweep = df[df["table"] == "harness_interval_sweep"]
    assert set(sweep["p.checkpoint_every"].dropna()) == {10, 40}
    observed = sweep[(sweep["method"] == "observed") & (sweep["metric"] == "tor")]
    assert len(observed) == 4 and set(observed["p.restart"]) == {"warm"}
    assert len(sweep[sweep["method"] == "predicted_pooled"]) == 2
    # the optimum rows are what the sweep rows say: best mean = argmax of the seed-mean observed TOR,
    # shortfall = its mean TOR minus that of the grid point nearest the prediction (paired over seeds)
    mean_tor = observed.groupby("p.checkpoint_every")["value"].mean()
    assert opt[opt["method"] == "empirical_best_mean"]["value"].iloc[0] == mean_tor.idxmax()
    nearest = int(gap["p.nearest_steps"].iloc[0])
    assert gap["value"].iloc[0] == pytest.approx(mean_tor.max() - mean_tor[nearest])
    pooled = sweep[sweep["method"] == "predicted_pooled"].set_index("p.checkpoint_every")["value"]
    assert opt[opt["method"] == "predicted_grid_best"]["value"].iloc[0] == pooled.idxmax()
    # the jobs ran in the stage's own folder, and its summary holds what the rows say
    (folder,) = stage_dirs("harness")
    jobs = sorted(p.name for p in (folder / "jobs").iterdir())
    assert jobs == ["sweep_seed1_every10", "sweep_seed1_every40", "sweep_seed2_every10", "sweep_seed2_every40",
                    "validation"]
    assert (folder / "jobs" / "validation" / "supervisor_events.jsonl").is_file()
    summary = json.loads((folder / "harness.json").read_text())
    assert summary["validation"]["observed"] == pytest.approx(tor["observed"])
    assert summary["optimum"]["empirical_best_mean_steps"] == mean_tor.idxmax()
    import exp_tor.figures  # noqa: F401
    from common.plotting import FIGURES
    for key in ("exp_tor/harness_rt", "exp_tor/harness_interval_sweep"):
        assert FIGURES[key].func(df) is not None

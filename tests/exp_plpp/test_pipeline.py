"""exp_plpp end to end on a tiny config: every stage writes its rows, the summary's paired differences are
recomputed from the per-run rows, and a run SIGKILLed inside each resumable stage (CLIP pretraining, the
prompt-learning stages) finishes with exactly the rows of an uninterrupted run without redoing finished runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.results import read_run, run_dirs
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "exp_plpp" / "run.py"
EXP = "exp_plpp"
TINY = [
    "threads=1", "testbed.pretrain_cap=300", "testbed.test_per_class=3", "tower.embed_dim=32",
    "tower.channels=[8,16]", "pretrain.epochs=3", "pretrain.batch_size=64", "pretrain.warmup_steps=2",
    "learn.epochs=2", "learn.cocoop_epochs=1", "learn.cocoop_batch_size=4",
    "protocol.seeds=[1,2]", "protocol.datasets=[shapes]", "protocol.shots=[1,2]", "protocol.b2n_shots=2",
    "protocol.methods=[zeroshot,coop,coop_plpp,cocoop_plpp]", "protocol.fewshot_methods=[zeroshot,coop,coop_plpp]",
    "protocol.transfer_source=digits", "protocol.xd_targets=[shapes]", "protocol.dg_targets=[digits_blur]",
    "protocol.ablations=[label_mode=hard,k=8]", "protocol.tune=[lambda_ppl=1,lambda_ppl=2]",
    "protocol.tune_methods=[coop_plpp]",
]
pytestmark = pytest.mark.slow


def _env(root: Path) -> dict:
    return subprocess_env(LLM4ALL_RESULTS=str(root / "results"), LLM4ALL_OUTPUTS=str(root / "outputs"))


def _rows(root: Path) -> list[dict]:
    out = []
    for d in run_dirs(root / "results"):
        out += read_run(d)[1]
    return out


def _values(rows: list[dict], skip_metrics: tuple[str, ...] = ("seconds", "train_seconds")) -> dict[tuple, float]:
    vals = {}
    for r in rows:
        if r["table"] == "stage_time" or r["metric"] in skip_metrics:
            continue
        key = (r["table"], r["method"], r["metric"], r.get("seed"), json.dumps(r.get("params") or {}, sort_keys=True))
        assert key not in vals, f"row logged twice: {key}"
        vals[key] = r["value"]
    return vals


@pytest.fixture(scope="module")
def testbed_sources(data_root) -> Path:
    from common.data import DatasetNotAvailableError
    from exp_plpp.datasets import load_raw

    try:   # the testbed's sources outside ../shared/data: Debian dataset-fashion-mnist, PyPI easy-vqa
        load_raw("fashion", data_root, part="test")
        load_raw("shapes", data_root, part="test")
    except DatasetNotAvailableError as exc:
        pytest.skip(str(exc))
    return data_root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, testbed_sources) -> Path:
    root = tmp_path_factory.mktemp("plpp_ref")
    proc = subprocess.run([sys.executable, str(RUN), *TINY], env=_env(root), cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def test_every_stage_writes_rows(reference):
    rows = _rows(reference)
    tables = {r["table"] for r in rows}
    assert {"plpp_testbed", "plpp_pretrain", "plpp_zeroshot", "plpp_b2n", "plpp_fewshot", "plpp_xd", "plpp_dg",
            "plpp_source", "plpp_summary"} <= tables, tables
    b2n = [r for r in rows if r["table"] == "plpp_b2n"]
    assert {r["method"] for r in b2n} == {"zeroshot", "coop", "coop_plpp", "cocoop_plpp"}
    for r in b2n:
        assert 0 <= r["value"] <= 1
    hm = {(r["method"], r["seed"]): r["value"] for r in b2n if r["metric"] == "hm"}
    base = {(r["method"], r["seed"]): r["value"] for r in b2n if r["metric"] == "base"}
    novel = {(r["method"], r["seed"]): r["value"] for r in b2n if r["metric"] == "novel"}
    for k, v in hm.items():
        b, n = base[k], novel[k]
        assert v == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    zs = [r for r in rows if r["table"] == "plpp_zeroshot"]
    assert {r["params"]["classes"] for r in zs} == {"all", "base", "novel"}
    assert {r["method"] for r in rows if r["table"] == "plpp_fewshot"} == {"zeroshot", "coop", "coop_plpp"}


def test_summary_pairs_match_the_per_run_rows(reference):
    rows = _rows(reference)
    per = {}
    for r in rows:
        if r["table"] == "plpp_b2n" and r["metric"] == "hm":
            per[(r["method"], r.get("seed", 0))] = r["value"]
    summary = {(r["method"], r["metric"]): r["value"] for r in rows
               if r["table"] == "plpp_summary" and r["params"]["setting"] == "b2n"}
    seeds = (1, 2)
    diff = sum(per[("coop_plpp", s)] - per[("coop", s)] for s in seeds) / 2
    assert summary[("coop_plpp-coop", "hm_diff_mean")] == pytest.approx(diff, abs=1e-12)
    assert summary[("coop", "hm_mean")] == pytest.approx(sum(per[("coop", s)] for s in seeds) / 2, abs=1e-12)
    assert ("cocoop_plpp-cocoop", "hm_diff_mean") not in summary   # no cocoop arm: nothing to pair with
    abl = {r.get("seed"): r["value"] for r in rows if r["table"] == "plpp_ablation" and r["metric"] == "hm"
           and r["method"] == "coop_plpp[label_mode=hard]"}
    assert set(abl) == {1, 2}
    for other in ("coop", "coop_plpp"):
        diff = sum(abl[s] - per[(other, s)] for s in seeds) / 2
        assert summary[(f"coop_plpp[label_mode=hard]-{other}", "hm_diff_mean")] == pytest.approx(diff, abs=1e-12)


def test_tune_picks_the_best_validation_candidate_and_the_later_stages_use_it(reference):
    rows = _rows(reference)
    val: dict[tuple, list[float]] = {}
    for r in rows:
        if r["table"] == "plpp_tune":
            val.setdefault((r["params"]["dataset"], r["method"], r["params"]["candidate"]), []).append(r["value"])
    cells = {(d, m) for d, m, _ in val}
    assert cells == {("digits", "coop_plpp"), ("shapes", "coop_plpp")}   # protocol.tune_methods
    assert all(len(v) == 2 for v in val.values()) and len(val) == 4     # both seeds of both candidates
    chosen = {(r["params"]["dataset"], r["method"]): r["params"]["candidate"] for r in rows
              if r["table"] == "plpp_tune_choice" and r["metric"] == "chosen" and r["value"] == 1.0}
    assert chosen.keys() == cells
    for (d, m), c in chosen.items():   # the argmax of the seed means, the first candidate on a tie
        order = ["lambda_ppl=1", "lambda_ppl=2"]
        means = {cand: sum(val[(d, m, cand)]) / 2 for cand in order}
        assert c == max(order, key=lambda k: (means[k], -order.index(k)))
    # base2novel trains exactly the tune job of the chosen candidate (same classes, shots, seed): same losses;
    # neither candidate is the plpp section's default (lambda_ppl = 0.1), so this fails if the choice is not applied
    hist = {(r["table"], r["params"]["dataset"], r["method"], r["seed"], r["params"].get("candidate")): r["value"]
            for r in rows if r["table"] in ("plpp_tune_train", "plpp_b2n_train") and r["metric"] == "final_l_ppl"}
    c = chosen[("shapes", "coop_plpp")]
    for seed in (1, 2):
        assert hist[("plpp_b2n_train", "shapes", "coop_plpp", seed, None)] == \
            hist[("plpp_tune_train", "shapes", "coop_plpp", seed, c)]
    assert ("plpp_b2n_train", "shapes", "cocoop_plpp", 1, None) in hist   # untuned: the plpp section as written
    # ablations sit on top of the tuned candidate: k=8 is the plpp section's own value, so that ablation
    # trains exactly what base2novel trains (with the section as written it would train lambda_ppl = 0.1)
    abl = {r["seed"]: r["value"] for r in rows if r["table"] == "plpp_ablation_train"
           and r["method"] == "coop_plpp[k=8]" and r["metric"] == "final_l_ppl"}
    assert abl == {s: hist[("plpp_b2n_train", "shapes", "coop_plpp", s, None)] for s in (1, 2)}
    # the report's tune table marks exactly these candidates, next to the seed means of the per-run rows
    from common.results import latest_rows, load_results
    from exp_plpp.figures import table_tune

    shown = table_tune(latest_rows(load_results(reference / "results", from_records=True)))
    assert len(shown) == len(val)
    for _, r in shown.iterrows():
        assert r["val acc"] == pytest.approx(sum(val[(r["dataset"], r["method"], r["candidate"])]) / 2)
        assert (r["chosen"] == "yes") == (chosen[(r["dataset"], r["method"])] == r["candidate"])


# (stage, a file that shows finished work inside the partial folder: kill right after it appears)
KILL_POINTS = [("pretrain_clip", "state.pt"), ("tune", "runs/*.json"), ("base2novel", "runs/*.json"),
               ("fewshot", "runs/*.json"), ("transfer", "runs/*.json")]


def test_sigkill_in_each_stage_resumes_exactly(reference, tmp_path, testbed_sources):
    env = _env(tmp_path)
    for stage, pattern in KILL_POINTS:
        proc = subprocess.Popen([sys.executable, str(RUN), *TINY], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        kept: dict[Path, int] = {}
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            hits = [p for d in (tmp_path / "outputs" / EXP / stage).glob(".partial-*") for p in d.glob(pattern)]
            if hits:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                if pattern.startswith("runs/"):
                    kept = {p: p.stat().st_mtime_ns for p in hits}
                break
            time.sleep(0.02)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == -signal.SIGKILL, f"{stage}: the run ended before the kill point\n{out[-2000:]}"
        nxt = subprocess.run([sys.executable, str(RUN), *TINY, f"stages=[{stage}]"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=900)
        assert nxt.returncode == 0, nxt.stdout[-3000:] + nxt.stderr[-3000:]
        for p, mtime in kept.items():   # finished runs are not redone
            final = Path(str(p).replace(f"{os.sep}.partial-", os.sep))
            assert final.stat().st_mtime_ns == mtime, f"{stage}: {final.name} was recomputed"
    fin = subprocess.run([sys.executable, str(RUN), *TINY], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert fin.returncode == 0, fin.stderr[-3000:]
    want, got = _values(_rows(reference)), _values(_rows(tmp_path))
    assert got.keys() == want.keys()
    bad = {k: (got[k], want[k]) for k in want if got[k] != pytest.approx(want[k], rel=1e-6, abs=1e-9)}
    assert not bad, list(bad.items())[:5]


def test_bad_override_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(RUN), "protocol.methods=[coop_plpq]"], env=_env(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "coop_plpq" in proc.stderr and "Traceback" not in proc.stderr


def test_two_process_launch_gives_the_one_process_rows(reference, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU is a gloo world of 2: the prompt-learning runs
    are shared out (each run is one process's, with the same seed and one thread), so every row equals the
    1-process reference exactly; the world size is recorded in the run's manifest."""
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate CLI not installed next to this python")
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(RUN), *TINY],
                          env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    worlds = {read_run(d)[0].get("world_size") for d in run_dirs(tmp_path / "results")}
    assert worlds == {2}, f"not a 2-process world: {worlds}"
    want, got = _values(_rows(reference)), _values(_rows(tmp_path))
    assert got.keys() == want.keys()
    bad = {k: (got[k], want[k]) for k in want if got[k] != pytest.approx(want[k], rel=1e-6, abs=1e-9)}
    assert not bad, list(bad.items())[:5]

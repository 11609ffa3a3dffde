"""exp_curriculum part 2 end to end on a tiny synthetic EN/FR corpus: every study stage from the scored
documents to the rows; the same config and seed give the same curves (and other seeds / arms do not); the
easy->hard arm's order really goes from easy to hard; a 2-process launch (gloo world of 2) gives the
1-process curves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import rows_with_world, subprocess_env

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "exp_curriculum" / "run.py"
EN_EASY = "the cat sat on a mat and the dog ran to the sun".split()
EN_HARD = ("notwithstanding heterogeneous epistemological considerations, parliamentary jurisprudence "
           "circumscribes extraordinarily idiosyncratic administrative responsibilities").split()
FR_EASY = "le chat est sur la table et le chien va au parc".split()
FR_HARD = ("nonobstant les considérations épistémologiques hétérogènes, la jurisprudence parlementaire "
           "circonscrit des responsabilités administratives extraordinairement idiosyncrasiques").split()
ARMS = "[random,easy_to_hard:compression,competence:entropy:root=1,select:random,mix:en_fraction=0.25]"
TINY = ["num_proc=1", "threads=1", "semdedup.enabled=false", "corpus.doc_chars=400", "corpus.min_chars=100",
        "study.data.vocab_size=300", "study.data.seq_len=16", "study.data.tokenizer_docs=100",
        "study.data.val_sequences=16", "study.data.reference_sequences=32",
        "study.model.d_model=16", "study.model.n_layers=1", "study.model.n_heads=2", "study.model.d_ff=32",
        "study.train.global_batch=8", "study.train.warmup_steps=2", "study.train.eval_every=4",
        "study.train.checkpoint_every=8", "study.train.eval_batch_size=16", "study.reference.epochs=1",
        "study.budget_sequences=128", f"study.arms={ARMS}", "study.schedules=[constant,wsd]",
        "study.wsd_arms=[easy_to_hard:compression]", "study.seeds=[0,1]",
        "stages=[metrics,dedup,study_data,study_reference,study_select,study_train,study_table]"]


def _doc(rng: np.random.Generator, easy: list[str], hard: list[str]) -> str:
    """Paragraphs of sentences whose share of hard words varies across documents (difficulty spread)."""
    p_hard = rng.random()
    sents = []
    for _ in range(rng.integers(6, 10)):
        words = [hard[i] if rng.random() < p_hard else easy[j]
                 for i, j in zip(rng.integers(0, len(hard), 12), rng.integers(0, len(easy), 12))]
        sents.append(" ".join(words).capitalize() + ".")
    return " ".join(sents)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_data")
    rng = np.random.default_rng(0)
    (root / "text/en/c4").mkdir(parents=True)
    (root / "text/fr/gutenberg").mkdir(parents=True)
    en = [json.dumps({"text": _doc(rng, EN_EASY, EN_HARD)}) for _ in range(120)]
    (root / "text/en/c4/c4_demo.jsonl").write_text("\n".join(en), encoding="utf-8")
    fr = "\n\n".join(_doc(rng, FR_EASY, FR_HARD) for _ in range(120))
    (root / "text/fr/gutenberg/demo.txt").write_text(f"*** START OF THE PROJECT GUTENBERG EBOOK DEMO ***\n\n{fr}\n\n"
                                                     "*** END OF THE PROJECT GUTENBERG EBOOK DEMO ***\n",
                                                     encoding="utf-8")
    return root


def _run(args: list[str], data: Path, root: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = subprocess_env(LLM4ALL_RESULTS=str(root / "results"), LLM4ALL_OUTPUTS=str(root / "outputs"),
                         LLM4ALL_DATA=str(data))
    cmd = [*(launcher or [sys.executable]), str(RUN), "--profile", "quick", *TINY, *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)


def _runs(root: Path) -> dict[str, dict]:
    """Finished study runs (name -> result JSON) of the study_train folder under root."""
    folders = list((root / "outputs/exp_curriculum/study_train").glob("*/runs"))
    assert len(folders) == 1, folders
    return {p.stem: json.loads(p.read_text()) for p in folders[0].glob("*.json")}


def _curves(runs: dict[str, dict]) -> dict[str, np.ndarray]:
    return {n: np.array([[p["val_en"], p["val_fr"]] for p in r["curve"]]) for n, r in runs.items()}


@pytest.fixture(scope="module")
def first(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("study_first")
    proc = _run([], corpus, root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def test_every_study_stage_runs_and_logs_rows(first):
    runs = _runs(first)
    # 5 arms x 2 seeds under constant, random + the one wsd arm x 2 seeds under wsd
    assert len(runs) == 14 and {r["steps"] for r in runs.values()} == {16}
    assert all(len(r["curve"]) == 5 and r["curve"][0]["step"] == 0 for r in runs.values())  # 0, 4, ..., 16
    rows = rows_with_world(first)
    tables = {r["table"] for r in rows}
    assert {"curriculum_curves", "curriculum_convergence", "curriculum_speedup", "curriculum_study_data"} <= tables
    curves = [r for r in rows if r["table"] == "curriculum_curves" and r["metric"] == "val_loss_en"]
    assert len(curves) == 14 * 5
    speed = {(r["method"], r["params"]["schedule"], r["params"]["eval"]) for r in rows
             if r["table"] == "curriculum_speedup" and r["metric"] == "final_loss_minus_random"}
    assert ("easy_to_hard:compression", "wsd", "mean") in speed and ("select:random", "constant", "fr") in speed
    # the baseline's own target is reached by definition: its tokens_to_target row exists for every seed
    base = [r for r in rows if r["table"] == "curriculum_convergence" and r["method"] == "random"
            and r["metric"] == "tokens_to_target" and r["params"]["eval"] == "mean"]
    assert len(base) == 4 and {r["_world"] for r in rows} == {1}


def test_orders_have_the_intended_difficulty_profile(first):
    runs = _runs(first)
    e2h = runs["constant__easy_to_hard-compression__s0"]["pool_difficulty"]["compression"]
    rnd = runs["constant__random__s0"]["pool_difficulty"]["compression"]
    assert all(a < b for a, b in zip(e2h, e2h[1:]))              # each tenth harder than the one before
    assert e2h[0] < 0.2 and e2h[-1] > 0.8
    assert max(rnd) - min(rnd) < 0.35                               # shuffled: no trend
    mix = runs["constant__mix-en_fraction=0.25__s0"]["pool_en_fraction"]
    assert mix == pytest.approx(0.25, abs=1 / 64) and runs["constant__random__s0"]["pool_en_fraction"] == 0.5


def test_same_seed_gives_the_same_curves(first, corpus, tmp_path):
    proc = _run([], corpus, tmp_path)                               # a fresh outputs folder: nothing cached
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _curves(_runs(first)), _curves(_runs(tmp_path))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[n], b[n]) for n in a)
    # and the test can fail: other seeds and other orders give other curves
    assert not np.array_equal(a["constant__random__s0"], a["constant__random__s1"])
    assert not np.array_equal(a["constant__random__s0"], a["constant__easy_to_hard-compression__s0"])
    assert np.array_equal(a["constant__random__s0"][0], a["constant__easy_to_hard-compression__s0"][0])  # same init


@pytest.mark.slow
def test_two_process_launch_gives_the_one_process_curves(first, corpus, tmp_path):
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate CLI not installed next to this python")
    # the upstream stages are copied: the 2-process launch trains and tables only
    for stage in ("metrics", "dedup", "study_data", "study_reference", "study_select"):
        shutil.copytree(first / "outputs/exp_curriculum" / stage, tmp_path / "outputs/exp_curriculum" / stage)
    proc = _run(["stages=[study_train,study_table]"], corpus, tmp_path,
                launcher=[str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = rows_with_world(tmp_path)
    assert rows and {r["_world"] for r in rows} == {2}, "not a 2-process world"
    one, two = _runs(first), _runs(tmp_path)
    assert one.keys() == two.keys() and all(r["world_size"] == 2 for r in two.values())
    # DDP averages the two halves' mean losses; the 1-process loss is the mean over the whole batch (all
    # sequences have the same length, so they are equal up to rounding order): curves agree closely
    for n in one:
        assert np.allclose(_curves(one)[n], _curves(two)[n], rtol=2e-3), n
    n_curve_rows = [r for r in rows if r["table"] == "curriculum_curves"]
    assert len(n_curve_rows) == len([r for r in rows_with_world(first) if r["table"] == "curriculum_curves"])


def test_run_claims_are_exclusive_and_released_by_dead_claimants(tmp_path):
    import os
    import socket

    from exp_curriculum.study_stages import claim_run

    assert claim_run(tmp_path, "a") and claim_run(tmp_path, "a")       # created, then held by me
    claim = tmp_path / "train" / "b.claim"
    claim.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    claim.write_text(json.dumps({"pid": os.getppid(), "host": host}))   # a live other process
    assert not claim_run(tmp_path, "b")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim.write_text(json.dumps({"pid": int(dead.stdout), "host": host}))  # that process has exited
    assert claim_run(tmp_path, "b") and json.loads(claim.read_text())["pid"] == os.getpid()
    claim.write_text(json.dumps({"pid": 1, "host": host + "-elsewhere"}))  # another machine: never taken
    assert not claim_run(tmp_path, "b")


@pytest.mark.slow
def test_a_worker_beside_the_study_trains_a_share_of_the_same_runs(first, corpus, tmp_path):
    for stage in ("metrics", "dedup", "study_data", "study_reference", "study_select"):
        shutil.copytree(first / "outputs/exp_curriculum" / stage, tmp_path / "outputs/exp_curriculum" / stage)
    env = subprocess_env(LLM4ALL_RESULTS=str(tmp_path / "results"), LLM4ALL_OUTPUTS=str(tmp_path / "outputs"),
                         LLM4ALL_DATA=str(corpus))
    worker = subprocess.Popen([sys.executable, str(REPO / "exp_curriculum/study_worker.py"), "--profile", "quick",
                               *TINY, "--reverse"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    head = []
    for line in worker.stdout:                   # the worker is training before the study starts
        head.append(line)
        if line.startswith("study_train:"):
            break
    study = _run([], corpus, tmp_path)
    rest, _ = worker.communicate(timeout=600)
    out = "".join(head) + rest
    assert study.returncode == 0 and worker.returncode == 0, study.stderr[-2000:] + out[-2000:]
    by_worker = sum("final val" in line for line in out.splitlines())
    by_study = sum("final val" in line for line in study.stdout.splitlines())
    assert by_worker >= 1 and by_worker + by_study == 14                  # shared out, none trained twice
    a, b = _curves(_runs(first)), _curves(_runs(tmp_path))
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)

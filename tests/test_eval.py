"""common.eval: lm-eval tasks on the local files (prompts equal lm-eval's own task configs), stratified
subsamples, MMLU categories, both backends on a tiny model, results-table rows."""

from __future__ import annotations

from pathlib import Path

import lm_eval
import pytest
import torch
import yaml

from common.eval import (
    CATEGORIES,
    MMLU_CATEGORIES,
    MMLU_HEADER,
    build_tasks,
    evaluate_multiple_choice,
    log_scores,
    stratified_subsample,
)
from common.models import build_causal_lm, train_bpe_tokenizer

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


def test_stratified_subsample_is_proportional_seeded_and_nested():
    strata = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    pick = stratified_subsample(strata, 10, seed=3)
    assert [strata[i] for i in pick].count("a") == 5 and [strata[i] for i in pick].count("c") == 2
    assert pick == sorted(pick) and pick == stratified_subsample(strata, 10, seed=3)
    assert pick != stratified_subsample(strata, 10, seed=4)
    assert set(pick) <= set(stratified_subsample(strata, 20, seed=3))  # growing n only adds items
    # largest remainders: quotas 1.5 / 0.9 / 0.6 -> floors 1 / 0 / 0, the 2 spare go to b and c
    small = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    assert sorted(small[i] for i in stratified_subsample(small, 3, seed=0)) == ["a", "b", "c"]
    assert stratified_subsample(strata, None) == stratified_subsample(strata, 500) == list(range(100))
    with pytest.raises(ValueError, match=">= 1"):
        stratified_subsample(strata, 0)


def _lm_eval_yaml(*parts: str) -> dict:
    return yaml.safe_load((LM_EVAL_TASKS.joinpath(*parts)).read_text())


def test_mmlu_categories_and_headers_are_lm_eval_s(data_root):
    from common.data import mmlu_subjects

    files = sorted((LM_EVAL_TASKS / "mmlu" / "default").glob("mmlu_*.yaml"))
    assert len(files) == 57 == len(MMLU_CATEGORIES)
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        subject = cfg["dataset_name"]
        assert cfg["tag"] == f"mmlu_{MMLU_CATEGORIES[subject]}_tasks", subject
        assert cfg["description"] == MMLU_HEADER.format(subject.replace("_", " "))
    assert sorted(MMLU_CATEGORIES) == mmlu_subjects("test") and set(MMLU_CATEGORIES.values()) == set(CATEGORIES)


def _contexts(task, num_fewshot: int, seed: int = 1234) -> list[tuple[str, str]]:
    task.set_config("num_fewshot", num_fewshot)
    task.set_fewshot_seed(seed)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [inst.args for inst in task.instances]


def test_prompts_equal_lm_eval_own_mmlu_and_arc_configs(data_root):
    """Oracle: lm-eval's own task YAMLs (tasks/mmlu/default, tasks/arc/arc_easy.yaml) fed the same rows."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    subjects = ["anatomy", "high_school_us_history"]
    objects, layout = build_tasks(["mmlu", "arc_easy"], subsample=12, mmlu_subjects=subjects)
    assert layout["mmlu"] == ["mmlu_anatomy", "mmlu_high_school_us_history"] and layout["arc_easy"] == ["arc_easy"]
    ours = {t.config.task: t for t in objects[0].get_all_tasks()} | {"arc_easy": objects[1]}
    default = _lm_eval_yaml("mmlu", "default", "_default_template_yaml")
    for subject in subjects:
        mine = ours[f"mmlu_{subject}"]
        rows = {"test": mine.dataset["test"], "dev": mine.dataset["train"]}
        cfg = {**default, **_lm_eval_yaml("mmlu", "default", f"mmlu_{subject}.yaml")}
        for key in ("include", "tag", "dataset_path", "dataset_name"):
            cfg.pop(key, None)
        theirs = ConfigurableTask(config={**cfg, "custom_dataset": lambda rows=rows, **_: datasets.DatasetDict(rows)})
        for k in (0, 5):
            assert _contexts(mine, k) == _contexts(theirs, k), (subject, k)
    # ARC: lm-eval's config reads the hub layout (choices.text/label, answerKey); 2-shot uses its seeded sampler
    arc = ours["arc_easy"]

    def hub_layout(split):
        return datasets.Dataset.from_list([
            {"question": r["question"], "answerKey": "ABCDE"[r["answer"]],
             "choices": {"text": r["choices"], "label": list("ABCDE"[: len(r["choices"])])}}
            for r in arc.dataset[split]])
    cfg = {k: v for k, v in _lm_eval_yaml("arc", "arc_easy.yaml").items() if k not in ("tag", "dataset_path",
                                                                                       "dataset_name")}
    cfg["validation_split"] = None
    theirs = ConfigurableTask(config={**cfg, "custom_dataset": lambda **_: datasets.DatasetDict(
        {"test": hub_layout("test"), "train": hub_layout("train")})})
    for k in (0, 2):
        assert _contexts(arc, k) == _contexts(theirs, k), k
    assert "Question:" in _contexts(arc, 2)[0][0] and _contexts(arc, 0)[0][1].startswith(" ")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = train_bpe_tokenizer(["Question: Which is a planet? Answer: Mars is a planet. " * 20], vocab_size=300)
    model = build_causal_lm("gpt2", vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, max_seq_len=2048)
    return model.eval(), tok


def test_both_backends_on_tiny_model_give_identical_scores(data_root, tiny):
    model, tok = tiny
    kw = dict(subsample=16, num_fewshot=1, batch_size=4, mmlu_subjects=["astronomy", "philosophy", "virology"])
    fast, fast_samples = evaluate_multiple_choice(model, tok, ["arc_easy", "mmlu"], return_samples=True, **kw)
    hf, hf_samples = evaluate_multiple_choice(model, tok, ["arc_easy", "mmlu"], backend="hf", return_samples=True,
                                              **kw)
    assert set(fast) == {"arc_easy", "mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_other"}
    for task, s in fast.items():
        assert s["n"] == hf[task]["n"] and s["num_fewshot"] == 1
        for m in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            assert s[m] == pytest.approx(hf[task][m]), (task, m)
    assert fast["arc_easy"]["n"] == fast["mmlu"]["n"] == 16 and fast["arc_easy"]["acc_stderr"] > 0
    for task, rows in fast_samples.items():
        for a, b in zip(rows, hf_samples[task], strict=True):
            assert max(abs(x - y) for x, y in zip(a["loglikelihoods"], b["loglikelihoods"], strict=True)) < 1e-4
    # the group score is the size-weighted mean of its subjects (lm-eval's weight_by_size)
    per_subject = evaluate_multiple_choice(model, tok, ["mmlu"], per_subject=True, **kw)
    subjects = [f"mmlu_{s}" for s in kw["mmlu_subjects"]]
    n = sum(per_subject[s]["n"] for s in subjects)
    assert n == 16 and per_subject["mmlu"]["acc"] == pytest.approx(
        sum(per_subject[s]["acc"] * per_subject[s]["n"] for s in subjects) / n)


def test_subsample_is_the_same_questions_for_every_model(data_root, tiny):
    model, tok = tiny
    other = build_causal_lm("gpt2", vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, max_seq_len=2048).eval()

    def questions(m):
        _, samples = evaluate_multiple_choice(m, tok, ["arc_easy"], subsample=12, subsample_seed=5,
                                              batch_size=6, return_samples=True)
        return [(s["doc_id"], s["target"]) for s in samples["arc_easy"]]

    def ids(seed):
        return build_tasks(["arc_easy"], subsample=12, subsample_seed=seed)[0][0].dataset["test"]["id"]

    assert questions(model) == questions(other) and ids(5) == ids(5) != ids(6)
    objects, _ = build_tasks(["arc_easy"], subsample=12, subsample_seed=5)
    assert len(objects[0].dataset["test"]) == 12 and len(objects[0].dataset["train"]) == 2251  # shots: all


def test_log_scores_writes_acc_and_acc_norm_rows(tmp_path):
    from common.results import Run, load_results

    scores = {"arc_easy": {"acc": 0.5, "acc_stderr": 0.05, "acc_norm": 0.55, "acc_norm_stderr": 0.049, "n": 100,
                           "num_fewshot": 0},
              "mmlu_stem": {"acc": 0.3, "acc_stderr": float("nan"), "acc_norm": 0.3, "acc_norm_stderr": 0.1, "n": 1,
                            "num_fewshot": 5}}
    run = Run("common", root=tmp_path)
    assert log_scores(run, scores, table="tab_eval", method="base", params={"model": "tiny"}) == 4
    run.finish()
    df = load_results(tmp_path).sort_values(["p.task", "metric"])
    assert list(df["metric"]) == ["acc", "acc_norm", "acc", "acc_norm"]
    assert list(df["value"]) == [0.5, 0.55, 0.3, 0.3] and list(df["n"]) == [100, 100, 1, 1]
    assert df["stderr"].iloc[0] == 0.05 and df["stderr"].isna().iloc[2]  # NaN stderr -> empty cell
    assert set(df["p.model"]) == {"tiny"} and list(df["p.num_fewshot"]) == [0, 0, 5, 5]
    assert set(df["table"]) == {"tab_eval"} and set(df["method"]) == {"base"}


def test_unknown_task_and_backend(data_root, tiny):
    with pytest.raises(KeyError, match="known: arc_easy, arc_challenge, mmlu"):
        build_tasks(["hellaswag"])
    with pytest.raises(ValueError, match="'fast' or 'hf'"):
        evaluate_multiple_choice(*tiny, ["arc_easy"], subsample=2, backend="vllm")


def test_bench_help_runs_nothing_and_only_filters(tmp_path):
    import subprocess
    import sys

    from common.paths import REPO_ROOT, results_dir

    def bench(*args):
        return subprocess.run([sys.executable, "scripts/bench.py", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=60)

    out = bench("--help")
    assert out.returncode == 0 and "usage:" in out.stdout and "--only" in out.stdout and "==>" not in out.stdout
    assert not (results_dir() / "runs").exists()  # nothing ran, nothing was written
    listed = bench("--list")
    assert listed.returncode == 0 and {"lowp", "eval", "exp_tor"} <= set(listed.stdout.split())
    bad = bench("--only", "eval,bogus")
    assert bad.returncode == 2 and "unknown benchmark(s) bogus" in bad.stderr


def test_eval_bench_on_a_tiny_model_records_rows(data_root, tiny, tmp_path):
    from common import eval_bench
    from common.results import load_results

    model, tok = tiny
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    assert eval_bench.main(["--model", str(tmp_path / "tiny"), "--questions", "6", "--batch-size", "4"]) == 0
    df = load_results().set_index(["method", "metric"])
    assert set(df["table"]) == {"bench_eval"} and (df["p.questions"] == 6).all()
    assert df.loc[("fast_vs_hf", "speedup"), "value"] == pytest.approx(
        df.loc[("fast", "questions_per_s"), "value"] / df.loc[("hf", "questions_per_s"), "value"])
    assert df.loc[("fast_vs_hf", "max_abs_delta_loglik"), "value"] < 1e-4

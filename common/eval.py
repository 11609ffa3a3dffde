"""Multiple-choice evaluation (ARC, MMLU) with lm-eval as the harness, on the local data files.

lm-eval owns prompts, few-shot contexts, metrics and standard errors; this module builds its task
objects from the validated local files (``common.data``) with the same templates as lm-eval's own
``arc_easy`` / ``arc_challenge`` / ``mmlu`` tasks, and runs ``lm_eval.simple_evaluate`` with either the
fast shared-context backend (``common.fast_lm``, default) or lm-eval's ``HFLM`` on an in-memory model
(a transformers causal LM or an unmerged peft ``PeftModel``).

MMLU is lm-eval's layout: one task per subject (header "The following are multiple choice questions
(with answers) about {subject}.", few-shot examples = the first k of that subject's dev split) inside
four category groups (STEM, humanities, social sciences, other) inside one ``mmlu`` group; group scores
are lm-eval's size-weighted aggregates. ``subsample=n`` evaluates a fixed-seed stratified subsample (by
subject for MMLU, by answer position for ARC): the same questions for every model given the seed.

    scores = evaluate_multiple_choice(model, tok, ["arc_easy", "mmlu"], subsample=400, num_fewshot=0)
    scores["arc_easy"]  -> {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "num_fewshot"}
    scores["mmlu"], scores["mmlu_stem"], scores["mmlu_humanities"], scores["mmlu_social_sciences"],
    scores["mmlu_other"]  (and "mmlu_<subject>" with per_subject=True)
    log_scores(run, scores, table="tab_main", method="lora_full", params={"budget": 0.05})
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np

from common.data import load_arc, load_mmlu

log = logging.getLogger(__name__)

METRICS = ("acc", "acc_norm")
TASKS = ("arc_easy", "arc_challenge", "mmlu")
CATEGORIES = ("stem", "humanities", "social_sciences", "other")
MMLU_HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"

# lm-eval's subject -> category map (the ``tag`` of each tasks/mmlu/default/mmlu_<subject>.yaml)
_CATEGORY_SUBJECTS = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
MMLU_CATEGORIES: dict[str, str] = {s: cat for cat, subjects in _CATEGORY_SUBJECTS.items() for s in subjects.split()}

# lm-eval's templates (tasks/arc/arc_easy.yaml, tasks/mmlu/default/_default_template_yaml) on our columns:
# question, choices (list of texts), answer (index of the correct choice)
ARC_TEMPLATE = {"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
                "doc_to_target": "answer"}
MMLU_TEMPLATE = {"doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}"
                                "\nD. {{choices[3]}}\nAnswer:",
                 "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer"}
_AGGREGATE = [{"metric": m, "weight_by_size": True} for m in METRICS]


def stratified_subsample(strata: Sequence[Hashable], n: int | None, seed: int = 0) -> list[int]:
    """Indices (sorted) of a fixed-seed stratified random subsample of ``n`` items.

    Each stratum gets its proportional share (largest-remainder rounding, so the shares sum to ``n``)
    and, inside it, the items with the smallest seeded random keys: the subsample depends only on
    (strata, n, seed), and growing ``n`` only adds items to strata whose share grows. ``None`` or
    ``n >= len(strata)`` keeps everything.
    """
    total = len(strata)
    if n is None or n >= total:
        return list(range(total))
    if n < 1:
        raise ValueError(f"subsample must be >= 1 (or None for everything), got {n}")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        members[s].append(i)
    order = sorted(members, key=str)
    quota = {s: n * len(members[s]) / total for s in order}
    share = {s: math.floor(quota[s]) for s in order}
    for s in sorted(order, key=lambda s: (share[s] - quota[s], str(s)))[: n - sum(share.values())]:
        share[s] += 1
    keys = np.random.default_rng(seed).random(total)
    picked = [i for s in order for i in sorted(members[s], key=lambda i: keys[i])[: share[s]]]
    return sorted(picked)


def _mc_columns(ds: Any) -> list[dict]:
    cols = [c for c in ("id", "subject", "question", "choices", "answer") if c in ds.column_names]
    return ds.select_columns(cols).to_list()


def _task(name: str, test: list[dict], shots: list[dict], template: dict, description: str = "",
          fewshot_first_n: bool = False) -> Any:
    """An lm-eval ConfigurableTask over in-memory rows (test docs + few-shot pool)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    def dataset(**_: Any) -> Any:  # lm-eval passes the task metadata; the rows are fixed here
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(test),
                                     "train": datasets.Dataset.from_list(shots)})

    config = {
        "task": name, "custom_dataset": dataset, "output_type": "multiple_choice", "test_split": "test",
        "description": description, **template,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
        "metadata": {"version": 1.0, "source": "llm4all local files"},
    }
    if fewshot_first_n:  # MMLU: the first k dev examples of the subject, as lm-eval's mmlu
        config.update(fewshot_split="train", fewshot_config={"sampler": "first_n"})
    else:  # ARC: lm-eval's default sampler (seeded random draws from the training split)
        config.update(training_split="train")
    return ConfigurableTask(config=config)


def _group(name: str, children: list[Any]) -> Any:
    from lm_eval.api.group import Group

    group = Group.from_config({"group": name, "aggregate_metric_list": _AGGREGATE, "metadata": {"version": 1}})
    for child in children:
        group.add(child)
    return group


def build_tasks(tasks: Sequence[str], split: str = "test", subsample: int | None = None,
                subsample_seed: int = 0, mmlu_subjects: Sequence[str] | None = None) -> tuple[list[Any], dict]:
    """lm-eval task/group objects for ``tasks`` and their layout ``{name: [leaf task names]}`` (a leaf
    task maps to itself; ``mmlu`` and ``mmlu_<category>`` to their subjects' tasks)."""
    _quiet_lm_eval()
    objects, layout = [], {}
    for task in tasks:
        if task in ("arc_easy", "arc_challenge"):
            subset = "ARC-Easy" if task == "arc_easy" else "ARC-Challenge"
            test = _mc_columns(load_arc(subset, split))
            keep = stratified_subsample([r["answer"] for r in test], subsample, subsample_seed)
            objects.append(_task(task, [test[i] for i in keep], _mc_columns(load_arc(subset, "train")),
                                 ARC_TEMPLATE))
            layout[task] = [task]
        elif task == "mmlu":
            group, mmlu_layout = _mmlu_group(split, subsample, subsample_seed, mmlu_subjects)
            objects.append(group)
            layout.update(mmlu_layout)
        else:
            raise KeyError(f"unknown evaluation task '{task}'; known: {', '.join(TASKS)}")
    return objects, layout


def _mmlu_group(split: str, subsample: int | None, seed: int, subjects: Sequence[str] | None):
    test = _mc_columns(load_mmlu(split, list(subjects) if subjects else None))
    keep = stratified_subsample([r["subject"] for r in test], subsample, seed)
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for i in keep:
        by_subject[test[i]["subject"]].append(test[i])
    dev: dict[str, list[dict]] = defaultdict(list)
    for row in _mc_columns(load_mmlu("dev", sorted(by_subject))):
        dev[row["subject"]].append(row)
    unknown = sorted(set(by_subject) - set(MMLU_CATEGORIES))
    if unknown:
        raise KeyError(f"MMLU subject(s) without an lm-eval category: {unknown}")
    layout: dict[str, list[str]] = {"mmlu": []}
    categories = []
    for cat in CATEGORIES:
        subjects_here = sorted(s for s in by_subject if MMLU_CATEGORIES[s] == cat)
        if not subjects_here:  # a subject filter or a tiny subsample can leave a category empty
            continue
        children = [_task(f"mmlu_{s}", by_subject[s], dev[s], MMLU_TEMPLATE,
                          MMLU_HEADER.format(s.replace("_", " ")), fewshot_first_n=True) for s in subjects_here]
        categories.append(_group(f"mmlu_{cat}", children))
        layout[f"mmlu_{cat}"] = [f"mmlu_{s}" for s in subjects_here]
        layout["mmlu"] += layout[f"mmlu_{cat}"]
        layout.update({f"mmlu_{s}": [f"mmlu_{s}"] for s in subjects_here})
    return _group("mmlu", categories), layout


def make_lm(model: Any, tokenizer: Any, backend: str = "fast", batch_size: int = 8, device: str | None = None,
            **kwargs: Any) -> Any:
    """The lm-eval model for an in-memory model: ``"fast"`` (FastMultipleChoiceLM) or ``"hf"`` (HFLM)."""
    if backend == "fast":
        from common.fast_lm import FastMultipleChoiceLM as cls
    elif backend == "hf":
        from lm_eval.models.huggingface import HFLM as cls
    else:
        raise ValueError(f"backend must be 'fast' or 'hf', got '{backend}'")
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, **kwargs)


class _PerTaskNoise(logging.Filter):
    """Drops two lm-eval notices repeated once per task (57 times for MMLU) that say nothing about
    in-memory local tasks; every other lm-eval message passes."""

    NOISE = ("Custom kwargs can be passed to `--metadata`", "Overwriting default num_fewshot of")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


def _quiet_lm_eval() -> None:
    for name in ("lm_eval.api.task", "lm_eval.evaluator"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PerTaskNoise) for f in logger.filters):
            logger.addFilter(_PerTaskNoise())


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else float("nan")  # lm-eval writes "N/A" for n = 1


@contextlib.contextmanager
def _as_single_process(lm: Any) -> Iterator[None]:
    """An LM of world size 1 inside a multi-process launch (each process evaluates its own models):
    lm-eval returns results only where LOCAL_RANK is 0, so it is 0 for the call."""
    saved = os.environ.get("LOCAL_RANK")
    if getattr(lm, "world_size", 1) == 1 and saved not in (None, "0"):
        os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["LOCAL_RANK"] = saved


def evaluate_multiple_choice(model: Any, tokenizer: Any, tasks: Sequence[str], split: str = "test",
                             num_fewshot: int = 0, subsample: int | None = None, subsample_seed: int = 0,
                             backend: str = "fast", batch_size: int = 8, mmlu_subjects: Sequence[str] | None = None,
                             device: str | None = None, seed: int = 0, per_subject: bool = False,
                             return_samples: bool = False):
    """acc / acc_norm with lm-eval's standard errors per task (and MMLU group), see the module docstring.

    ``model`` may also be a ready lm-eval ``LM`` (then ``tokenizer``, ``backend``, ``batch_size`` and
    ``device`` are unused), to reuse one across calls. With ``return_samples`` the result is
    ``(scores, samples)``, samples = {leaf task: [{"doc_id", "target", "loglikelihoods", "is_greedy",
    "acc", "acc_norm"}, ...]} in document order.
    """
    from lm_eval import simple_evaluate
    from lm_eval.api.metrics import mean_stderr
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    objects, layout = build_tasks(tasks, split, subsample, subsample_seed, mmlu_subjects)
    lm = model if isinstance(model, LM) else make_lm(model, tokenizer, backend, batch_size, device)
    with _as_single_process(lm):
        out = simple_evaluate(model=lm, tasks=objects, task_manager=TaskManager(include_defaults=False),
                              num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=100,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    samples = {name: sorted(rows, key=lambda s: s["doc_id"]) for name, rows in out["samples"].items()}
    scores = {}
    for name, leaves in layout.items():
        if name.startswith("mmlu_") and name[5:] in MMLU_CATEGORIES and not per_subject:
            continue
        res, pooled = out["results"][name], [s for t in leaves for s in samples[t]]
        scores[name] = {"num_fewshot": num_fewshot, "n": len(pooled)}
        for m in METRICS:
            scores[name][m] = _num(res.get(f"{m},none"))
            # groups: lm-eval's pooled formula is "N/A" as soon as one subject has a single question (small
            # stratified subsamples); the stderr of the mean over the group's questions, which that formula
            # approximates, is always defined. Leaf tasks: lm-eval's own (the same formula).
            se = mean_stderr([s[m] for s in pooled]) if len(leaves) > 1 and len(pooled) > 1 else res.get(
                f"{m}_stderr,none")
            scores[name][f"{m}_stderr"] = _num(se)
    if not return_samples:
        return scores
    return scores, {name: [{"doc_id": s["doc_id"], "target": s["target"],
                            "loglikelihoods": [r[0] for r in s["filtered_resps"]],
                            "is_greedy": [r[1] for r in s["filtered_resps"]],
                            "acc": s["acc"], "acc_norm": s["acc_norm"]} for s in rows]
                    for name, rows in samples.items()}


def log_scores(run: Any, scores: dict[str, dict[str, float]], table: str, method: str,
               params: dict | None = None, metrics: Sequence[str] = METRICS) -> int:
    """Write each task's acc / acc_norm as rows of the results table (value, stderr and n columns;
    ``task`` and ``num_fewshot`` join ``params``). Returns the number of rows written."""
    rows = 0
    for task, s in scores.items():
        row_params = {"task": task, "num_fewshot": int(s.get("num_fewshot", 0)), **(params or {})}
        for m in metrics:
            stderr = s.get(f"{m}_stderr")
            run.log(table=table, method=method, metric=m, value=float(s[m]),
                  stderr=None if stderr is None or math.isnan(stderr) else float(stderr),
                  n=int(s["n"]), params=row_params)
            rows += 1
    return rows

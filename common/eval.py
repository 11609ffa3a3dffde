"""Multiple-choice evaluation through lm-eval itself, on the local ARC / MMLU files.

lm-eval's own tasks point at the hub; here we generate task YAMLs (same prompt templates as lm-eval's
``arc_easy`` / ``mmlu`` tasks) whose ``dataset_path: json`` points at validated copies of the local
files, and run ``lm_eval.simple_evaluate`` with an ``HFLM`` wrapping an in-memory model.

    scores = evaluate_multiple_choice(model, tokenizer, ["arc_easy", "mmlu"], limit=200)
    scores["arc_easy"] -> {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": .., "n": ..}
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from common.data import load_arc, load_mmlu
from common.models import cache_dir

log = logging.getLogger(__name__)

# Prompt templates copied in spirit from lm-eval's arc_easy.yaml and mmlu/_default_template_yaml so that
# numbers are comparable with the harness's standard tasks.
TASKS: dict[str, dict[str, Any]] = {
    "arc_easy": {"loader": lambda split: load_arc("ARC-Easy", split), "fewshot_split": "train",
                 "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
                 "metrics": ["acc", "acc_norm"]},
    "arc_challenge": {"loader": lambda split: load_arc("ARC-Challenge", split), "fewshot_split": "train",
                      "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
                      "metrics": ["acc", "acc_norm"]},
    "mmlu": {"loader": lambda split, subjects=None: load_mmlu(split, subjects), "fewshot_split": "dev",
             "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}"
                            "\nD. {{choices[3]}}\nAnswer:",
             "doc_to_choice": ["A", "B", "C", "D"], "metrics": ["acc", "acc_norm"]},
}


def _write_jsonl(rows: list[dict], folder: Path, stem: str) -> Path:
    text = "".join(json.dumps({"question": r["question"], "choices": r["choices"], "answer": r["answer"],
                               "id": r["id"]}) + "\n" for r in rows)
    path = folder / f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def build_task_dir(task: str, split: str = "test", subjects: list[str] | None = None,
                   out_dir: Path | None = None) -> tuple[Path, str]:
    """Write the local lm-eval task YAML (+ its data files) for ``task``; returns (dir, task name)."""
    if task not in TASKS:
        raise KeyError(f"unknown evaluation task '{task}'; known: {', '.join(TASKS)}")
    spec = TASKS[task]
    folder = out_dir or cache_dir() / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    kw = {"subjects": subjects} if task == "mmlu" else {}
    test_rows = list(spec["loader"](split, **kw))
    shot_rows = list(spec["loader"](spec["fewshot_split"], **kw))
    name = f"llm4all_{task}" + (f"_{hashlib.sha256(','.join(subjects).encode()).hexdigest()[:8]}"
                                if subjects else "") + f"_{split}"
    cfg = {
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(_write_jsonl(test_rows, folder, f"{task}-{split}")),
                                          "train": str(_write_jsonl(shot_rows, folder, f"{task}-shots"))}},
        "output_type": "multiple_choice", "test_split": "test", "fewshot_split": "train",
        "fewshot_config": {"sampler": "first_n"}, "doc_to_text": spec["doc_to_text"],
        "doc_to_target": "answer", "doc_to_choice": spec["doc_to_choice"],
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in spec["metrics"]],
        "metadata": {"version": 1.0, "source": "llm4all local files"},
    }
    task_dir = folder / name
    task_dir.mkdir(exist_ok=True)
    (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return task_dir, name


def evaluate_multiple_choice(model: Any, tokenizer: Any, tasks: list[str], split: str = "test",
                             limit: int | None = None, num_fewshot: int = 0, batch_size: int = 8,
                             mmlu_subjects: list[str] | None = None, device: str | None = None,
                             seed: int = 0) -> dict[str, dict[str, float]]:
    """acc / acc_norm (and their stderr) per task, computed by lm-eval on the local files.

    Standard errors are lm-eval's analytic ones for mean metrics (bootstrap_iters only matters for others).
    """
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dirs, names = [], {}
    for task in tasks:
        d, name = build_task_dir(task, split, mmlu_subjects if task == "mmlu" else None)
        dirs.append(str(d))
        names[name] = task
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    tm = TaskManager(include_path=dirs, include_defaults=False)
    out = simple_evaluate(model=lm, tasks=list(names), task_manager=tm, num_fewshot=num_fewshot, limit=limit,
                          log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed)
    scores = {}
    for name, task in names.items():
        res = out["results"][name]
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        scores[task] = {m: float(res[f"{m},none"]) for m in TASKS[task]["metrics"]}
        for m in TASKS[task]["metrics"]:
            se = res.get(f"{m}_stderr,none")
            scores[task][f"{m}_stderr"] = float(se) if isinstance(se, (int, float)) else float("nan")
        scores[task]["n"] = int(n) if n is not None else -1
    return scores

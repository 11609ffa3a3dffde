"""Benchmark: multiple-choice questions/s of the fast backend (``common.fast_lm``) vs lm-eval's HFLM.

Both backends score the very same lm-eval requests (built once from the local task: same questions, same
prompts), with the same model, batch size and torch threads, in one process; only the
``loglikelihood`` call is timed (wall clock and process CPU time), after a short untimed warm-up of each
(``--repeats k``: the backends alternate k times and each keeps its fastest run).
The run checks that both give the same answers (max |Δ log-likelihood|, is_greedy, acc), prints
the ratio and appends rows to the results table (experiment "common", table "bench_eval").

    python -m common.eval_bench                                   # SmolLM2, 100 ARC-Easy test questions
    python -m common.eval_bench --task mmlu --num-fewshot 5 --questions 16 --mmlu-subjects astronomy,sociology
    python -m common.eval_bench --no-record                       # print only
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from common.eval import build_tasks, make_lm
from common.models import load_causal_lm
from common.results import Run

TABLE = "bench_eval"


def build_requests(task: str, questions: int, num_fewshot: int, seed: int,
                   mmlu_subjects: list[str] | None = None) -> tuple[list[Any], list[Any]]:
    """lm-eval's requests for a fixed-seed stratified subsample of ``task`` (and its lm-eval tasks)."""
    objects, _ = build_tasks([task], subsample=questions, subsample_seed=seed, mmlu_subjects=mmlu_subjects)
    tasks = objects[0].get_all_tasks() if hasattr(objects[0], "get_all_tasks") else objects
    requests = []
    for t in tasks:
        t.set_config("num_fewshot", num_fewshot)
        t.set_fewshot_seed(seed)
        t.build_all_requests(limit=None, rank=0, world_size=1)
        requests += t.instances
    return requests, tasks


def accuracy(requests: list[Any], answers: list[tuple[float, bool]]) -> float:
    """Share of questions whose highest-log-likelihood choice is the target (lm-eval's acc)."""
    by_doc: dict[tuple[str, int], list[tuple[int, float]]] = {}
    target = {}
    for req, (ll, _) in zip(requests, answers, strict=True):
        key = (req.task_name, req.doc_id)
        by_doc.setdefault(key, []).append((req.idx, ll))
        target[key] = req.doc["answer"]
    right = sum(max(lls, key=lambda t: t[1])[0] == target[k] for k, lls in by_doc.items())
    return right / len(by_doc)


def time_backend(lm: Any, requests: list[Any], warmup: int = 8) -> tuple[list[tuple[float, bool]], float, float]:
    lm.loglikelihood(requests[:warmup], disable_tqdm=True)  # first-call allocations, thread pools
    wall, cpu = time.perf_counter(), time.process_time()
    answers = lm.loglikelihood(requests, disable_tqdm=True)
    return answers, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="offline alias, folder or hub ID")
    ap.add_argument("--task", default="arc_easy", choices=["arc_easy", "arc_challenge", "mmlu"])
    ap.add_argument("--questions", type=int, default=100, help="stratified test subsample size")
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--mmlu-subjects", default=None, help="comma-separated MMLU subjects (default: all 57)")
    ap.add_argument("--batch-size", type=int, default=8, help="the same for both backends")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the backends this often, keep each's best")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true", help="do not append rows to the results table")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model, tok = load_causal_lm(args.model)
    subjects = args.mmlu_subjects.split(",") if args.mmlu_subjects else None
    requests, _ = build_requests(args.task, args.questions, args.num_fewshot, args.seed, subjects)
    n = len({(r.task_name, r.doc_id) for r in requests})
    print(f"{args.model}: {n} {args.task} questions ({len(requests)} requests), {args.num_fewshot}-shot, "
          f"batch size {args.batch_size}, {threads} torch threads")
    lms = {backend: make_lm(model, tok, backend, batch_size=args.batch_size) for backend in ("fast", "hf")}
    results: dict[str, dict] = {}
    for rep in range(args.repeats):  # alternating, best of each: fairer on a machine with other load
        for backend, lm in lms.items():
            answers, wall, cpu = time_backend(lm, requests)
            best = results.get(backend)
            if best is None or wall < best["wall"]:
                results[backend] = {"answers": answers, "wall": wall, "cpu": cpu, "acc": accuracy(requests, answers)}
            print(f"  {backend:4s} (run {rep + 1}): {n / wall:7.2f} questions/s  (wall {wall:7.1f} s, "
                  f"cpu {cpu:7.1f} s, acc {results[backend]['acc']:.4f})", flush=True)
    fast, hf = results["fast"], results["hf"]
    delta = max(abs(a[0] - b[0]) for a, b in zip(fast["answers"], hf["answers"], strict=True))
    greedy_same = all(a[1] == b[1] for a, b in zip(fast["answers"], hf["answers"], strict=True))
    speedup = hf["wall"] / fast["wall"]
    print(f"  fast / hf: {speedup:.2f}x questions/s (cpu-time ratio {hf['cpu'] / fast['cpu']:.2f}x); "
          f"max |d loglik| {delta:.2e}, is_greedy identical: {greedy_same}, acc identical: "
          f"{fast['acc'] == hf['acc']}")
    if not args.no_record:
        params = {"model": args.model, "task": args.task, "questions": n, "num_fewshot": args.num_fewshot,
                  "batch_size": args.batch_size, "threads": threads, "mmlu_subjects": args.mmlu_subjects or "all"}
        run = Run("common", config={"bench": vars(args)}, seed=args.seed, profile="bench")
        for backend, r in results.items():
            run.log(table=TABLE, method=backend, metric="questions_per_s", value=n / r["wall"], n=n, params=params)
        run.log(table=TABLE, method="fast_vs_hf", metric="speedup", value=speedup, n=n, params=params)
        run.log(table=TABLE, method="fast_vs_hf", metric="cpu_time_ratio", value=hf["cpu"] / fast["cpu"], n=n,
                params=params)
        run.log(table=TABLE, method="fast_vs_hf", metric="max_abs_delta_loglik", value=delta, n=len(requests),
                params=params)
        print(f"results: {run.finish()}")
    return 0 if greedy_same and delta <= 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())

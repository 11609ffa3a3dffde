"""LESS feature throughput: per-example gradient features/s through torch.func (vmap over grad) against the
per-example backward loop (LESS's own way), on the same real pool examples, the same LoRA model and the same
projection; then the evaluation benchmark (fast multiple-choice backend vs lm-eval's HFLM, common.eval_bench);
then the trajectory-matching benchmark (bench_distill.py: an outer iteration vs N fine-tuning steps, time and
peak memory vs N, with and without checkpointing of the inner steps).

    python exp_distill_data/bench.py                       # SmolLM2-135M-Instruct + LoRA r 8, 32 examples
    python exp_distill_data/bench.py --examples 64 --skip-eval
Appends rows to the results table (table "distill_bench": method = func|loop, metric = features_per_s;
method = func_vs_loop: speedup and min_cosine between the two methods' features).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common.results import Run
from exp_distill_data import less

TABLE = "distill_bench"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="offline alias, folder or hub ID")
    ap.add_argument("--examples", type=int, default=32, help="pool examples (ARC-Easy + MMLU auxiliary_train)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per batch (and per vmap chunk)")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (default targets of the architecture)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="alternate the methods this often, keep each's best")
    ap.add_argument("--eval-questions", type=int, default=100, help="ARC-Easy questions for the eval benchmark")
    ap.add_argument("--skip-eval", action="store_true", help="no evaluation benchmark")
    ap.add_argument("--skip-distill", action="store_true", help="no trajectory-matching benchmark")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    from common.models import load_causal_lm
    from common.sft import SFTConfig, apply_lora, encode_examples, make_collator
    from exp_distill_data.data import build_pool

    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model, attn_implementation="eager")
    model = apply_lora(model, args.r, 2.0 * args.r, 0.0, seed=0)
    pool = build_pool(["arc_easy", "mmlu_auxiliary_train"], mmlu_aux_limit=args.examples, seed=0,
                      prompt_format="eval")[:args.examples]
    sft = SFTConfig(max_len=args.max_len, template="plain", plain_template="{instruction}",
                    plain_template_input="{instruction}")
    enc = encode_examples(tok, pool, sft)
    collate = make_collator(tok)
    batches = [collate(enc[i:i + args.batch_size]) for i in range(0, len(enc), args.batch_size)]
    n, p = len(enc), less.num_trainable(model)
    print(f"{args.model} + LoRA r {args.r}: {p} trainable parameters; {n} examples, batch {args.batch_size}, "
          f"projection {args.proj_dim}, {torch.get_num_threads()} threads")
    proj = less.RandomProjector(args.proj_dim, seed=0)
    proj.project(torch.zeros(1, p))          # the projection tiles are cached before either method is timed
    for method in ("func", "loop"):         # untimed warm-up of each (first-call allocations, kernel choice)
        less.compute_features(model, batches[:1], kind="sgd", projector=proj, method=method, chunk=args.batch_size)
    best: dict[str, tuple[float, torch.Tensor]] = {}
    for rep in range(args.repeats):
        for method in ("func", "loop"):
            t0 = time.perf_counter()
            feats = less.compute_features(model, batches, kind="sgd", projector=proj, method=method,
                                          chunk=args.batch_size)
            wall = time.perf_counter() - t0
            if method not in best or wall < best[method][0]:
                best[method] = (wall, feats)
            print(f"  {method:4s} (run {rep + 1}): {n / wall:6.2f} features/s (wall {wall:6.1f} s)", flush=True)
    speedup = best["loop"][0] / best["func"][0]
    cos = F.cosine_similarity(best["func"][1].double(), best["loop"][1].double(), dim=1).min().item()
    print(f"  func / loop: {speedup:.2f}x features/s; min cosine between the two methods' features {cos:.6f}")
    if not args.no_record:
        params = {"model": args.model, "examples": n, "batch_size": args.batch_size, "max_len": args.max_len,
                  "proj_dim": args.proj_dim, "lora_r": args.r, "trainable_params": p,
                  "threads": torch.get_num_threads()}
        run = Run("exp_distill_data", config={"bench": vars(args)}, seed=0, profile="bench")
        for method, (wall, _) in best.items():
            run.log(table=TABLE, method=method, metric="features_per_s", value=n / wall, n=n, params=params)
        run.log(table=TABLE, method="func_vs_loop", metric="speedup", value=speedup, n=n, params=params)
        run.log(table=TABLE, method="func_vs_loop", metric="min_cosine", value=cos, n=n, params=params)
        print(f"results: {run.finish()}")
    rc = 0 if cos >= 0.9999 else 1
    if not args.skip_eval:
        from common import eval_bench

        extra = ["--no-record"] if args.no_record else []
        rc |= eval_bench.main(["--model", args.model, "--questions", str(args.eval_questions), "--threads",
                               str(args.threads), "--batch-size", "16", *extra])
    if not args.skip_distill:
        from exp_distill_data import bench_distill

        rc |= bench_distill.main(["--threads", str(args.threads), *(["--no-record"] if args.no_record else [])])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

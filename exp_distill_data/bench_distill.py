"""Cost of one trajectory-matching outer iteration vs the number of unrolled steps N, with and without
gradient checkpointing of each inner step, against N ordinary fine-tuning steps of the same batch (the
named peer: forward + backward + SGD update on the same LoRA parameters, no second-order graph).

    python exp_distill_data/bench_distill.py                     # OPT of the small source's shape, random init
    python exp_distill_data/bench_distill.py --model smollm2-135m-instruct --steps 1 2
Each (N, checkpointing) runs in its own process so that its peak resident memory is its own: the row
``peak_rss_delta_mib`` is the rise of the process's high-water mark over the set-up's (model, data,
trajectory loaded), i.e. the iteration's own peak; on CUDA, ``torch.cuda.max_memory_allocated``.
Rows (table ``distill_bench_tm``): seconds_per_iteration, seconds_per_finetune_steps, ratio_vs_finetune,
peak_rss_delta_mib per method ``tm`` / ``tm_ckpt``, params N.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

TABLE = "distill_bench_tm"
REPO = Path(__file__).resolve().parents[1]


def _setup(args):
    from common.models import build_causal_lm, load_causal_lm
    from common.sft import apply_lora
    from exp_distill_data.distill import SyntheticSet

    torch.manual_seed(0)
    if args.model == "opt-small-random":   # the small profile's source shape (exp_distill_data.source)
        model = build_causal_lm("opt", vocab_size=8192, d_model=128, n_layers=2, n_heads=4, d_ff=512,
                                max_seq_len=512, attn_implementation="eager")
    else:
        model, _ = load_causal_lm(args.model, attn_implementation="eager")
    model = apply_lora(model, args.r, 2.0 * args.r, 0.0, seed=0)
    if torch.cuda.is_available():
        model = model.cuda()
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model.requires_grad_(False)
    E = model.get_input_embeddings().weight
    dev = E.device
    g = torch.Generator().manual_seed(0)
    n, T, prompt = args.batch, args.length, args.length * 3 // 4
    ids = torch.randint(2, E.shape[0], (n, T), generator=g).to(dev)
    labels = ids.clone()
    labels[:, :prompt] = -100
    mask = torch.ones_like(ids)
    syn = SyntheticSet(ids, labels, mask, (labels == -100), E.detach()[ids].clone())
    params = dict(model.named_parameters())
    start = {k: params[k].detach().clone() + 0.01 * torch.randn_like(params[k]) for k in names}
    target = {k: v + 0.01 * torch.randn_like(v) for k, v in start.items()}
    return model, syn, start, target


def _measure(args) -> dict:
    """One (N, checkpointing) configuration: seconds per outer iteration, per N fine-tuning steps, memory."""
    from exp_distill_data.distill import causal_lm_loss, matching_loss, student_inputs, unroll

    torch.set_num_threads(args.threads)
    model, syn, start, target = _setup(args)
    E = model.get_input_embeddings().weight
    lr = torch.tensor(1e-2, device=E.device)
    embeds = syn.embeds.clone().requires_grad_(True)

    def outer():
        batches = [student_inputs(syn, embeds, E)] * args.n
        loss = matching_loss(unroll(model, start, lr, batches, args.checkpoint), start, target)
        loss.backward()
        embeds.grad = None

    def finetune_steps():   # the peer: N first-order SGD steps on the same batch and parameters
        theta = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
        inputs = student_inputs(syn, syn.embeds, E)
        for _ in range(args.n):
            loss = causal_lm_loss(model, theta, inputs)
            grads = torch.autograd.grad(loss, list(theta.values()))
            with torch.no_grad():
                theta = {k: (v - lr * gk).requires_grad_(True) for (k, v), gk in zip(theta.items(), grads)}

    finetune_steps()                      # untimed warm-ups
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    outer()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss)
    best_tm, best_ft = float("inf"), float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outer()
        best_tm = min(best_tm, time.perf_counter() - t0)
        t0 = time.perf_counter()
        finetune_steps()
        best_ft = min(best_ft, time.perf_counter() - t0)
    return {"seconds_per_iteration": best_tm, "seconds_per_finetune_steps": best_ft,
            "ratio_vs_finetune": best_tm / best_ft, "peak_mib": peak}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-small-random", help="opt-small-random, an offline alias or a hub ID")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10], help="N values")
    ap.add_argument("--batch", type=int, default=8, help="synthetic examples per inner step")
    ap.add_argument("--length", type=int, default=128, help="tokens per example (3/4 learnable prompt)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--one", type=str, default="", help=argparse.SUPPRESS)  # internal: N,checkpoint
    args = ap.parse_args(argv)
    if args.one:
        n, ck = args.one.split(",")
        args.n, args.checkpoint = int(n), ck == "1"
        print(json.dumps(_measure(args)))
        return 0
    results = []
    for n in args.steps:
        for ck in (False, True):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", f"{n},{int(ck)}", "--model", args.model,
                   "--batch", str(args.batch), "--length", str(args.length), "--r", str(args.r),
                   "--threads", str(args.threads), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append((n, ck, res))
            print(f"  N={n:2d} checkpoint={'on ' if ck else 'off'}: {res['seconds_per_iteration']:7.3f} s/iteration, "
                  f"{res['ratio_vs_finetune']:5.2f}x {n} fine-tuning steps ({res['seconds_per_finetune_steps']:.3f} s),"
                  f" peak +{res['peak_mib']:.0f} MiB", flush=True)
    if not args.no_record:
        from common.results import Run

        run = Run("exp_distill_data", config={"bench_distill": vars(args)}, seed=0, profile="bench")
        mem = "peak_cuda_mib" if torch.cuda.is_available() else "peak_rss_delta_mib"
        for n, ck, res in results:
            p = {"model": args.model, "N": n, "batch": args.batch, "length": args.length, "lora_r": args.r,
                 "threads": args.threads, "peer": "N fine-tuning steps (first-order SGD, same batch)"}
            method = "tm_ckpt" if ck else "tm"
            for metric in ("seconds_per_iteration", "seconds_per_finetune_steps", "ratio_vs_finetune"):
                run.log(table=TABLE, method=method, metric=metric, value=res[metric], params=p)
            run.log(table=TABLE, method=method, metric=mem, value=res["peak_mib"], params=p)
        print(f"results: {run.finish()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

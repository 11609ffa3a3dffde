"""Benchmark: training tokens/s of ``common.train`` vs transformers' ``Trainer`` on the same work, and the
overhead of the curriculum sampler per step (``python -m common.train_bench``; ``make bench`` runs it).

Same work on both sides: one randomly initialised Llama (the curriculum study's default size, the same
initial weights), the same fixed-length token sequences in the same order (a precomputed
``CurriculumSampler`` order on both sides, so neither pays for a different sampler), AdamW at a constant
learning rate without weight decay (Trainer exempts biases and norms from decay, common.train does not: with
none, both compute the same updates, which tests/test_train_bench.py checks), clipping at 1, no evaluation,
no checkpoint, no tracker, the same torch threads. Throughput is steady-state: the clock starts at the end
of step ``warmup`` and stops at step
``warmup + steps`` on both sides (a step_end callback in ``common.train``, a ``TrainerCallback.on_step_end``
in Trainer), so model building, the first steps' allocations and Trainer's set-up are outside both
measurements. The backends alternate ``repeats`` times; each side's median is reported.

Sampler overhead: the time to draw one batch of indices from ``CurriculumSampler`` minus torch's
``RandomSampler`` (iterating each over the same number of indices), per step and as a share of one measured
training step; plus ``make_order``'s one-off cost for a competence curriculum over the whole pool.

    python -m common.train_bench                       # defaults: d=128, 4 layers, batch 16 x 128 tokens
    python -m common.train_bench --steps 20 --repeats 1 --no-record
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TABLE = "train_bench"


class TokenSequences(torch.utils.data.Dataset):
    """Fixed-length random token sequences as causal-LM examples (labels = inputs)."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab_size, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def build_bench_model(args: argparse.Namespace) -> torch.nn.Module:
    """The benchmark's randomly initialised Llama (seeded: both sides start from the same weights)."""
    from common.models import build_causal_lm

    torch.manual_seed(args.seed)
    return build_causal_lm("llama", args.vocab_size, d_model=args.d_model, n_layers=args.n_layers,
                           n_heads=args.n_heads, d_ff=args.d_ff, max_seq_len=args.seq_len)


def _window(times: dict[int, float], warmup: int, steps: int) -> float:
    return times[warmup + steps] - times[warmup]


def time_common_train(model: torch.nn.Module, data: TokenSequences, order: np.ndarray,
                      args: argparse.Namespace) -> float:
    """Seconds of steps warmup+1 .. warmup+steps of common.train."""
    from common.curriculum import CurriculumSampler
    from common.train import TrainConfig, train

    times: dict[int, float] = {}

    def clock(event: str, info: dict) -> None:
        if event == "step_end":
            times[int(info["step"])] = time.perf_counter()

    cfg = TrainConfig(max_steps=args.warmup + args.steps, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=0.0, lr_schedule="constant", max_grad_norm=1.0, checkpoint_every=0,
                      log_every=10_000, seed=args.seed, cpu=True, log_with="none")
    with tempfile.TemporaryDirectory() as tmp:
        train(model, data, cfg, Path(tmp), callbacks=[clock], resume=False, sampler=CurriculumSampler(order))
    return _window(times, args.warmup, args.steps)


def time_hf_trainer(model: torch.nn.Module, data: TokenSequences, order: np.ndarray,
                    args: argparse.Namespace) -> float:
    """Seconds of steps warmup+1 .. warmup+steps of transformers.Trainer."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from common.curriculum import curriculum_trainer

    times: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):  # noqa: ANN001 - Trainer's signature
            times[int(state.global_step)] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size,
                                  max_steps=args.warmup + args.steps, learning_rate=args.lr, weight_decay=0.0,
                                  lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                                  optim="adamw_torch", logging_steps=10_000, save_strategy="no",
                                  report_to=[], use_cpu=True, dataloader_num_workers=0, seed=args.seed,
                                  disable_tqdm=True)
        trainer_cls = curriculum_trainer(Trainer, order)
        trainer_cls(model=model, args=targs, train_dataset=data, callbacks=[Clock()]).train()
    return _window(times, args.warmup, args.steps)


def sampler_overhead(n: int, batch_size: int, seed: int, repeats: int = 5) -> dict[str, float]:
    """Seconds per batch of indices: CurriculumSampler and RandomSampler over n indices; make_order's cost."""
    from common.curriculum import CurriculumSampler, OrderConfig, make_order

    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)
    t0 = time.perf_counter()
    order = make_order(difficulty, n, OrderConfig(strategy="competence"), seed, batch_size)
    order_s = time.perf_counter() - t0

    def per_batch(sampler: torch.utils.data.Sampler) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)
            k = sum(1 for _ in batches)
            best = min(best, (time.perf_counter() - t) / k)
        return best

    gen = torch.Generator().manual_seed(seed)
    return {"curriculum_s_per_batch": per_batch(CurriculumSampler(order)),
            "random_s_per_batch": per_batch(torch.utils.data.RandomSampler(range(n), generator=gen)),
            "make_order_s": order_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=352)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step, the same for both")
    ap.add_argument("--steps", type=int, default=60, help="timed steps (after the warm-up steps)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before the clock starts")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both")
    ap.add_argument("--repeats", type=int, default=2, help="alternate the backends this often; medians")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true", help="do not append rows to the results table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = (args.warmup + args.steps) * args.batch_size
    data = TokenSequences(n, args.seq_len, args.vocab_size, args.seed)
    order = np.random.default_rng(args.seed).permutation(n)
    base = build_bench_model(args)
    ours, hf = [], []
    for r in range(args.repeats):
        ours.append(time_common_train(copy.deepcopy(base), data, order, args))
        hf.append(time_hf_trainer(copy.deepcopy(base), data, order, args))
        print(f"repeat {r + 1}/{args.repeats}: common.train {ours[-1]:.2f} s, Trainer {hf[-1]:.2f} s "
              f"for {args.steps} steps", flush=True)
    tokens = args.steps * args.batch_size * args.seq_len
    ours_tps, hf_tps = tokens / statistics.median(ours), tokens / statistics.median(hf)
    ratio = ours_tps / hf_tps
    samp = sampler_overhead(max(n, 50_000), args.batch_size, args.seed)
    step_s = statistics.median(ours) / args.steps
    overhead = samp["curriculum_s_per_batch"] - samp["random_s_per_batch"]
    print(f"common.train {ours_tps:,.0f} tokens/s vs transformers.Trainer {hf_tps:,.0f} tokens/s: "
          f"ratio {ratio:.3f} (aim >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
    print(f"CurriculumSampler {samp['curriculum_s_per_batch'] * 1e6:.1f} us/batch vs RandomSampler "
          f"{samp['random_s_per_batch'] * 1e6:.1f} us/batch: overhead {overhead * 1e6:.1f} us/step = "
          f"{overhead / step_s:.2e} of a {step_s * 1e3:.0f} ms training step; make_order "
          f"{samp['make_order_s'] * 1e3:.1f} ms once")
    if not args.no_record:
        from common.results import Run

        params = {k: v for k, v in vars(args).items() if k != "no_record"}
        run = Run("common", config={"bench": params}, seed=args.seed, profile="bench")
        run.log(table=TABLE, method="common.train", metric="tokens_per_s", value=ours_tps, n=args.repeats,
                params=params)
        run.log(table=TABLE, method="transformers.Trainer", metric="tokens_per_s", value=hf_tps, n=args.repeats,
                params=params)
        run.log(table=TABLE, method="common.train_vs_Trainer", metric="throughput_ratio", value=ratio,
                n=args.repeats, params=params)
        sp = {**params, "pool": max(n, 50_000)}
        for method, key in (("CurriculumSampler", "curriculum_s_per_batch"), ("RandomSampler", "random_s_per_batch")):
            run.log(table=TABLE, method=method, metric="seconds_per_batch", value=samp[key], params=sp)
        run.log(table=TABLE, method="CurriculumSampler_minus_RandomSampler", metric="share_of_train_step",
                value=overhead / step_s, params=sp)
        run.log(table=TABLE, method="make_order_competence", metric="seconds", value=samp["make_order_s"], params=sp)
        print(f"results: {run.finish()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

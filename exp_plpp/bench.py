"""Cost of PLPP's losses: one prompt-learning step (forward, backward, SGD update) of CoOp + PLPP against
the named peer, a plain CoOp step on the same backbone, classes, context and image batch.

    python exp_plpp/bench.py                                   # both backbones below, 20 and 100 classes
    python exp_plpp/bench.py --backbones clip_b16_text --classes 100
Backbones: ``offline`` (the offline CLIP: MiniLM text tower, vocabulary 30522, bidirectional, so the LM head
reads every class's prompt) and ``clip_b16_text`` (a random CLIP with ViT-B/16's text tower: width 512,
12 layers, vocabulary 49408, causal, so one prompt row suffices; the vision side is not used since image
features are cached in prompt learning). Variants: ``coop_plpp`` (top-k student, the default) and
``coop_plpp_fullvocab`` (student log-softmax over the whole vocabulary).
Time: the three methods of one (backbone, classes) share a process and are timed in interleaved rounds
(``--repeats`` rounds of ``--steps`` steps each, rotating order), so drift of the machine hits all alike;
ratio_vs_coop is the median over rounds of the within-round ratio (low / high = its range), seconds_per_step
the fastest round. Memory: each (backbone, classes, method) runs alone in a process, so its peak resident
memory is its own: ``peak_rss_delta_mib`` is the rise of the high-water mark over the set-up's. Rows (table
``plpp_bench``): seconds_per_step, ratio_vs_coop(_low, _high), peak_rss_delta_mib, ratio_memory_vs_coop.
Aim: step time <= 1.3x CoOp.
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

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TABLE = "plpp_bench"
REPO = Path(__file__).resolve().parents[1]
METHODS = ["coop", "coop_plpp", "coop_plpp_fullvocab"]
COLOURS = ["red", "green", "blue", "yellow", "teal", "brown", "gray", "black", "white", "pink"]
OBJECTS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _backbone(name: str):
    if name == "offline":
        from exp_plpp.offline_clip import OfflineCLIP, TowerConfig

        return OfflineCLIP.build(TowerConfig()).freeze()
    if name == "clip_b16_text":
        from transformers import CLIPConfig

        from exp_plpp.clip_hf import HFCLIP, word_tokenizer

        tok = word_tokenizer(["a", "photo", "of", *COLOURS, *OBJECTS])
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        text = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                "num_attention_heads": 8, "max_position_embeddings": 77, **ids}
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 16, "patch_size": 8}
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)
        return HFCLIP.random(cfg, tokenizer=tok, seed=0)
    raise ValueError(f"unknown backbone '{name}': offline or clip_b16_text")


def _step_fn(model, names: list[str], method: str, feats: torch.Tensor, labels: torch.Tensor):
    """One prompt-learning step of ``method`` (its own prompts and optimiser) on the shared backbone."""
    import torch.nn.functional as F

    from exp_plpp.learn import class_logits, plpp_term
    from exp_plpp.plpp import PLPPConfig
    from exp_plpp.prompts import PromptConfig, PromptLearner

    learner = PromptLearner(model, names, PromptConfig(ctx_init="a photo of a"))
    plpp = PLPPConfig(full_vocab_student=method.endswith("fullvocab"))
    opt = torch.optim.SGD([learner.ctx], lr=1e-3, momentum=0.9)

    def step() -> None:
        logits, hidden, ctx, _ = class_logits(model, learner, feats, "coop")
        loss = F.cross_entropy(logits, labels)
        if method != "coop":
            loss = loss + plpp_term(model, learner, hidden, ctx, plpp, "coop")[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _setup(args):
    torch.set_num_threads(args.threads)
    model = _backbone(args.backbone)
    names = [f"{c} {o}" for c in COLOURS for o in OBJECTS][: args.n_classes]
    g = torch.Generator().manual_seed(0)
    dim = model.encode_text(["a"]).shape[1]
    feats = torch.nn.functional.normalize(torch.randn(args.batch, dim, generator=g), dim=-1)
    labels = torch.randint(0, len(names), (args.batch,), generator=g)
    return model, names, feats, labels


def _measure_memory(args) -> dict:
    """Peak resident memory of one method's steps, alone in this process."""
    model, names, feats, labels = _setup(args)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # model, features
    step = _step_fn(model, names, args.method, feats, labels)
    step()   # the first steps' high-water mark is the step's
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {"peak_mib": peak, "vocab": int(model.token_embedding.weight.shape[0])}


def _measure_time(args) -> dict:
    """Step times of every method on one backbone, interleaved: each round times ``steps`` steps of each
    method in a rotating order, so machine drift hits all methods alike; the ratio to CoOp is taken within a
    round (median and range over rounds)."""
    model, names, feats, labels = _setup(args)
    steps = {m: _step_fn(model, names, m, feats, labels) for m in METHODS}
    for fn in steps.values():   # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.repeats):
        for m in METHODS[r % len(METHODS):] + METHODS[: r % len(METHODS)]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[m]()
            times[m].append((time.perf_counter() - t0) / args.steps)
    out = {}
    for m in METHODS:
        ratios = sorted(t / c for t, c in zip(times[m], times["coop"]))
        out[m] = {"seconds_per_step": min(times[m]), "ratio_vs_coop": ratios[len(ratios) // 2],
                  "ratio_vs_coop_low": ratios[0], "ratio_vs_coop_high": ratios[-1]}
    return out


def _child(args, mode: str, what: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, what, "--batch", str(args.batch), "--steps",
           str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"bench child {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["offline", "clip_b16_text"])
    ap.add_argument("--classes", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)    # internal: backbone,classes,method (memory)
    ap.add_argument("--time", default="", help=argparse.SUPPRESS)   # internal: backbone,classes (timing)
    args = ap.parse_args(argv)
    if args.one or args.time:
        args.backbone, n, *m = (args.one or args.time).split(",")
        args.n_classes, args.method = int(n), (m[0] if m else "")
        print(json.dumps(_measure_memory(args) if args.one else _measure_time(args)))
        return 0
    results = []
    for bb in args.backbones:
        for n in args.classes:
            res = _child(args, "--time", f"{bb},{n}")
            for m in METHODS:   # memory: each method alone in a process, so the peak is its own
                res[m].update(_child(args, "--one", f"{bb},{n},{m}"))
            for m in METHODS:
                r = res[m]
                r["ratio_memory_vs_coop"] = (r["peak_mib"] / res["coop"]["peak_mib"]
                                             if res["coop"]["peak_mib"] > 0 else float("nan"))
                print(f"  {bb:14s} {n:4d} classes {m:20s} {r['seconds_per_step'] * 1e3:8.1f} ms/step "
                      f"{r['ratio_vs_coop']:5.2f}x CoOp ({r['ratio_vs_coop_low']:.2f}-{r['ratio_vs_coop_high']:.2f} "
                      f"over rounds), peak +{r['peak_mib']:.0f} MiB ({r['ratio_memory_vs_coop']:.2f}x)", flush=True)
                results.append((bb, n, m, r))
    if not args.no_record:
        from common.results import Run

        run = Run("exp_plpp", config={"bench": vars(args)}, seed=0, profile="bench")
        for bb, n, m, r in results:
            p = {"backbone": bb, "n_classes": n, "batch": args.batch, "threads": args.threads, "vocab": r["vocab"],
                 "peer": "CoOp step (same backbone, classes, context, batch)"}
            for metric in ("seconds_per_step", "ratio_vs_coop", "ratio_vs_coop_low", "ratio_vs_coop_high",
                           "ratio_memory_vs_coop"):
                run.log(table=TABLE, method=m, metric=metric, value=r[metric], params=p)
            run.log(table=TABLE, method=m, metric="peak_rss_delta_mib", value=r["peak_mib"], params=p)
        print(f"results: {run.finish()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

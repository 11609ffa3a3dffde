"""Cost of PLPP's losses: one prompt-learning step (forward, backward, SGD update) of CoOp + PLPP against
the named peer, a plain CoOp step on the same backbone, classes, context and image batch.

    python exp_plpp/bench.py                                   # both backbones below, 20 and 100 classes
    python exp_plpp/bench.py --backbones clip_b16_text --classes 100
Backbones: ``offline`` (the offline CLIP: MiniLM text tower, vocabulary 30522, bidirectional, so the LM head
reads every class's prompt) and ``clip_b16_text`` (a random CLIP with ViT-B/16's text tower: width 512,
12 layers, vocabulary 49408, causal, so one prompt row suffices; the vision side is not used since image
features are cached in prompt learning). Variants: ``coop_plpp`` (top-k student, the default) and
``coop_plpp_fullvocab`` (student log-softmax over the whole vocabulary).
Each (backbone, classes, method) runs in its own process, so its peak resident memory is its own: the row
``peak_rss_delta_mib`` is the rise of the high-water mark over the set-up's. Rows (table ``plpp_bench``):
seconds_per_step, ratio_vs_coop, peak_rss_delta_mib, ratio_memory_vs_coop. Aim: step time <= 1.3x CoOp.
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


def _measure(args) -> dict:
    import torch.nn.functional as F

    from exp_plpp.learn import class_logits, plpp_term
    from exp_plpp.plpp import PLPPConfig
    from exp_plpp.prompts import PromptConfig, PromptLearner

    torch.set_num_threads(args.threads)
    model = _backbone(args.backbone)
    names = [f"{c} {o}" for c in COLOURS for o in OBJECTS][: args.n_classes]
    learner = PromptLearner(model, names, PromptConfig(ctx_init="a photo of a"))
    plpp = PLPPConfig(full_vocab_student=args.method.endswith("fullvocab"))
    use_plpp = args.method != "coop"
    g = torch.Generator().manual_seed(0)
    dim = model.encode_text(["a"]).shape[1]
    feats = F.normalize(torch.randn(args.batch, dim, generator=g), dim=-1)
    labels = torch.randint(0, len(names), (args.batch,), generator=g)
    opt = torch.optim.SGD([learner.ctx], lr=1e-3, momentum=0.9)

    def step() -> None:
        logits, hidden, ctx, _ = class_logits(model, learner, feats, "coop")
        loss = F.cross_entropy(logits, labels)
        if use_plpp:
            loss = loss + plpp_term(model, learner, hidden, ctx, plpp, "coop")[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # model, prompts, features
    step()   # the warm-up: its high-water mark is the step's
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        times.append((time.perf_counter() - t0) / args.steps)
    return {"seconds_per_step": min(times), "peak_mib": peak, "vocab": int(model.token_embedding.weight.shape[0])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["offline", "clip_b16_text"])
    ap.add_argument("--classes", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)   # internal: backbone,classes,method
    args = ap.parse_args(argv)
    if args.one:
        args.backbone, n, args.method = args.one.split(",")
        args.n_classes = int(n)
        print(json.dumps(_measure(args)))
        return 0
    results = []
    for bb in args.backbones:
        for n in args.classes:
            res = {}
            for m in METHODS:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", f"{bb},{n},{m}", "--batch",
                       str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats), "--threads",
                       str(args.threads)]
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return proc.returncode
                res[m] = json.loads(proc.stdout.strip().splitlines()[-1])
            for m in METHODS:
                r = res[m]
                r["ratio_vs_coop"] = r["seconds_per_step"] / res["coop"]["seconds_per_step"]
                r["ratio_memory_vs_coop"] = (r["peak_mib"] / res["coop"]["peak_mib"]
                                             if res["coop"]["peak_mib"] > 0 else float("nan"))
                print(f"  {bb:14s} {n:4d} classes {m:20s} {r['seconds_per_step'] * 1e3:8.1f} ms/step "
                      f"{r['ratio_vs_coop']:5.2f}x CoOp, peak +{r['peak_mib']:.0f} MiB "
                      f"({r['ratio_memory_vs_coop']:.2f}x)", flush=True)
                results.append((bb, n, m, r))
    if not args.no_record:
        from common.results import Run

        run = Run("exp_plpp", config={"bench": vars(args)}, seed=0, profile="bench")
        for bb, n, m, r in results:
            p = {"backbone": bb, "n_classes": n, "batch": args.batch, "threads": args.threads, "vocab": r["vocab"],
                 "peer": "CoOp step (same backbone, classes, context, batch)"}
            for metric in ("seconds_per_step", "ratio_vs_coop", "ratio_memory_vs_coop"):
                run.log(table=TABLE, method=m, metric=metric, value=r[metric], params=p)
            run.log(table=TABLE, method=m, metric="peak_rss_delta_mib", value=r["peak_mib"], params=p)
        print(f"results: {run.finish()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

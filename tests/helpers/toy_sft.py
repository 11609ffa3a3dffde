"""A toy LoRA fine-tune through common.sft for the kill/resume test.

    python tests/helpers/toy_sft.py OUT_DIR TOKENIZER_DIR [--steps N] [--sleep S]

A tiny random Llama (seeded) with LoRA adapters (dropout on, so the RNG state matters) on ARC-Easy train
questions in the plain template; snapshots, validation and checkpoints on. Writes OUT_DIR/final.json with
the losses, validation curve and a SHA-256 of the final trainable weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from common.data import load_arc
from common.models import build_causal_lm
from common.sft import SFTConfig, finetune
from common.train import trainable_names


def arc_examples(n: int, offset: int = 0) -> list[dict]:
    rows = load_arc("ARC-Easy", "train").select(range(offset, offset + n))
    return [{"instruction": r["question"],
             "input": "\n".join(f"{lab}. {c}" for lab, c in zip(r["labels"], r["choices"])),
             "output": f"{r['answer_key']}. {r['choices'][r['answer']]}"} for r in rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("tokenizer_dir")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each step (kill window)")
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    torch.manual_seed(0)
    model = build_causal_lm("llama", vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, max_seq_len=128)
    cfg = SFTConfig(method="lora", r=4, alpha=8, dropout=0.1, lr=5e-3, max_steps=args.steps, warmup_ratio=0.1,
                    batch_size=4, grad_accum=2, max_len=96, checkpoint_every=2, keep_checkpoints=1,
                    snapshot_every=3, snapshot_optimizer=True, eval_every=4, log_with="none", seed=0)

    def slow(event: str, info: dict) -> None:
        if event == "step_end" and args.sleep:
            time.sleep(args.sleep)

    res = finetune(model, tok, arc_examples(40), cfg, args.out_dir, eval_examples=arc_examples(8, offset=40),
                   callbacks=[slow])
    params = dict(res.model.named_parameters())
    h = hashlib.sha256()
    for name in sorted(trainable_names(res.model)):
        h.update(name.encode())
        h.update(params[name].detach().cpu().contiguous().numpy().tobytes())
    out = {"final_loss": res.final_loss, "losses": res.losses, "evals": res.evals, "step": res.step,
           "resumed_from": res.resumed_from, "trainable_sha256": h.hexdigest()}
    (Path(args.out_dir) / "final.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()

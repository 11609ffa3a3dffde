"""A toy run of common.train for the kill/resume and multi-process tests.

    python tests/helpers/toy_train.py OUT_DIR [--steps N] [--sleep S] [--ckpt-every K]

Trains a tiny GPT-2 on random token sequences and writes OUT_DIR/final.json with the final loss, the
world size and a SHA-256 of the final weights (main process only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from common.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each step (kill window)")
    p.add_argument("--grad-accum", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg)  # dropout on: the RNG state must be restored for a bit-exact resume
    data = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row} for row in data]

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def slow(event: str, info: dict) -> None:
        if event == "step_end" and args.sleep:
            time.sleep(args.sleep)

    tcfg = TrainConfig(max_steps=args.steps, batch_size=4, grad_accum=args.grad_accum, lr=1e-3,
                       checkpoint_every=args.ckpt_every, keep_checkpoints=2, warmup_steps=2, seed=0)
    res = train(model, dataset, tcfg, args.out_dir, collate_fn=collate, callbacks=[slow])
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        out = {"final_loss": res.final_loss, "step": res.step, "world_size": state.num_processes,
               "weights_sha256": h.hexdigest(), "resumed_from": res.resumed_from}
        (Path(args.out_dir) / "final.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()

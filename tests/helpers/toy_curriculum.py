"""A toy common.train run on a curriculum order, for the kill/resume test of the sampler.

    python tests/helpers/toy_curriculum.py OUT_DIR [--sleep S]

Trains a tiny GPT-2 with ``CurriculumSampler(make_order(easy_to_hard))``; every optimizer step appends
"step idx idx ..." (the example indices it consumed) to OUT_DIR/seen.txt, and the end writes
OUT_DIR/final.json with the SHA-256 of the final weights and the order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from common.curriculum import CurriculumSampler, OrderConfig, make_order
from common.train import TrainConfig, train

N, SEQ, BATCH, STEPS = 48, 12, 4, 12


def order() -> np.ndarray:
    difficulty = np.random.default_rng(3).random(N)
    return make_order(difficulty, STEPS * BATCH, OrderConfig(strategy="competence", c0=0.1), seed=5,
                      batch_size=BATCH)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--sleep", type=float, default=0.0)
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    data = torch.randint(0, 64, (N, SEQ), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row, "idx": torch.tensor(i)} for i, row in enumerate(data)]
    seen: list[int] = []

    def loss_fn(m, batch):
        seen.extend(batch["idx"].tolist())
        return m(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def log_step(event: str, info: dict) -> None:
        if event == "step_end":
            with open(out / "seen.txt", "a") as f:
                f.write(" ".join(map(str, [info["step"], *seen])) + "\n")
                f.flush()
                os.fsync(f.fileno())
            seen.clear()
            time.sleep(args.sleep)

    cfg = TrainConfig(max_steps=STEPS, batch_size=BATCH, lr=1e-3, checkpoint_every=3, keep_checkpoints=1,
                      warmup_steps=2, seed=0, log_with="none")
    train(model, dataset, cfg, out / "run", loss_fn=loss_fn, callbacks=[log_step],
          sampler=CurriculumSampler(order()))
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    (out / "final.json").write_text(json.dumps({"weights_sha256": h.hexdigest(), "order": order().tolist()}))


if __name__ == "__main__":
    main()

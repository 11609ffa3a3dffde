"""The training benchmark runs end to end on a tiny model and times the same steps on both sides."""

from __future__ import annotations

import numpy as np
import pytest

from common import train_bench


def test_train_bench_tiny_run_prints_the_ratio(capsys):
    rc = train_bench.main(["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--d-ff", "32",
                           "--vocab-size", "300", "--seq-len", "8", "--batch-size", "4", "--steps", "3",
                           "--warmup", "1", "--repeats", "1", "--threads", "1", "--no-record"])
    out = capsys.readouterr().out
    assert rc == 0 and "tokens/s vs transformers.Trainer" in out and "us/batch" in out


def test_both_sides_see_the_same_batches(monkeypatch):
    """Same data, same order, same initial weights: after the same steps both trainers hold the same
    weights up to float rounding (AdamW, constant LR, clipping at 1 on both), so the timed work is equal."""
    import argparse
    import copy

    import torch

    args = argparse.Namespace(d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=300, seq_len=8,
                              batch_size=4, steps=3, warmup=1, lr=2e-3, seed=0)
    data = train_bench.TokenSequences(16, 8, 300, 0)
    order = np.random.default_rng(0).permutation(16)
    base = train_bench.build_bench_model(args)
    ours, hf = copy.deepcopy(base), copy.deepcopy(base)
    train_bench.time_common_train(ours, data, order, args)
    train_bench.time_hf_trainer(hf, data, order, args)
    moved = max((p - q).abs().max().item() for p, q in zip(base.parameters(), ours.parameters()))
    diff = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), hf.parameters()))
    assert moved > 1e-3 and diff < 1e-5 * max(1.0, moved), (moved, diff)
    assert torch.equal(data.data, train_bench.TokenSequences(16, 8, 300, 0).data)


if __name__ == "__main__":
    pytest.main([__file__])

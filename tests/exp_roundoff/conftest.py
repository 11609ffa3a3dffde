"""Tiny random-init models of the three families the tracer supports (float64, eval mode)."""

import pytest
import torch

from exp_roundoff.models import build_model


@pytest.fixture(params=["gpt2", "llama", "opt"])
def arch(request):
    return request.param


@pytest.fixture
def tiny(arch):
    torch.manual_seed(0)
    model = build_model(arch, vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=32,
                        n_kv_heads=2 if arch == "llama" else None)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, ids

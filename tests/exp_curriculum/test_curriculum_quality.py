"""exp_curriculum: ASK-LLM, Density sampling and the diversity coefficient on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models import build_causal_lm, train_bpe_tokenizer
from exp_curriculum import diversity as D
from exp_curriculum import quality as Q

TEXTS = ["The cat sat on the mat and looked at the birds in the garden.",
         "Le chat dort sur le tapis, et l'homme lit le journal du matin.",
         "yes yes no maybe yes",
         "Photosynthesis converts light energy into chemical energy stored in sugars."]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = train_bpe_tokenizer(TEXTS * 20 + ["yes Yes no"] * 5, vocab_size=320)
    model = build_causal_lm("gpt2", vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2, max_seq_len=512)
    return model.eval(), tok


def test_askllm_prompt_and_left_padding_invariance(tiny):
    model, tok = tiny
    prompts = Q.askllm_prompts(tok, TEXTS[:1])
    assert prompts[0].startswith("###\nThe cat sat") and "OPTIONS:\n- yes\n- no" in prompts[0]
    batch = Q.askllm_scores(model, tok, TEXTS, batch_size=4)
    solo = np.array([Q.askllm_scores(model, tok, [t], batch_size=1)[0] for t in TEXTS])
    assert batch.shape == (4,) and np.all((batch > 0) & (batch < 1))
    assert np.allclose(batch, solo, atol=1e-5)   # scores do not depend on padding / batch composition


def test_density_scores_and_inverse_propensity_sampling():
    rng = np.random.default_rng(0)
    dense = rng.normal([1, 0, 0], 0.01, size=(50, 3))        # one tight cluster
    sparse = np.eye(3)[1:] + rng.normal(0, 0.01, size=(2, 3))  # two isolated points
    emb = np.vstack([dense, sparse])
    s = Q.kernel_density(emb, bandwidth=0.3)
    assert s[:50].min() > s[50:].max()
    picks = np.concatenate([Q.density_sample(s, 5, seed=k) for k in range(200)])
    # isolated points have ~1/50 of the cluster's density, so they are picked far more often than 5/52
    assert np.isin(picks, [50, 51]).mean() > 0.3


def test_diversity_coefficient_tiny_probe(tiny):
    model, tok = tiny
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS * 4]
    same = [torch.tensor([ids[0][:8]] * 4)] * 3               # identical batches
    mixed = D.make_batches(ids, n_batches=3, batch_size=4, seq_len=8, seed=0)
    d_same = D.diversity_coefficient(model, same, finetune_epochs=1, micro_batch=4)
    d_mixed = D.diversity_coefficient(model, mixed, finetune_epochs=1, micro_batch=4)
    assert d_same["n_pairs"] == 3 and 0 <= d_same["div_coeff"] < d_mixed["div_coeff"] <= 1
    assert not any(torch.equal(mixed[0]["input_ids"], b["input_ids"]) for b in mixed[1:])  # a fresh seed per batch

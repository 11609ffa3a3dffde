"""Diversity coefficient (Lee, Miranda et al., "Beyond Scale", arXiv 2306.13840) with Task2Vec embeddings.

For each batch of sequences: copy the probe LM, fine-tune only its (untied) output head on the batch, then
estimate the diagonal Fisher information with targets *sampled* from the model's own softmax; the batch's
Task2Vec embedding is the filter-wise mean of the squared gradients of every weight except the head.
div(D) = mean cosine distance between the embeddings of different batches, after Task2Vec's pairwise
normalisation h0/(h0 + h1 + 1e-8). Each batch is drawn with its own seed (seed + batch index): the
reference `get_diversity_coefficient` reshuffles with the same seed every time, which makes all batches
identical (research note §2).

The published values (GPT-2 117M probe, 512 sequences of 128 tokens, 200 batches) are context only: a
different probe, batch size or language moves the coefficient, so local numbers are not comparable to them.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

# Published values (paper table, as listed in the research note); labelled "published" wherever shown.
PUBLISHED_DIVERSITY = {"C4": 0.2374, "WikiText-103": 0.2140, "The Pile": 0.2463,
                       "lower bound": 0.0525, "upper bound": 0.4037}


def _head(model: Any) -> torch.nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the probe has no output head (get_output_embeddings() is None)")
    return head


def task2vec_embedding(probe: Any, batch: torch.Tensor, finetune_epochs: int = 2, lr: float = 1e-3,
                       micro_batch: int = 8, seed: int = 0) -> np.ndarray:
    """Task2Vec embedding (float64 vector) of one batch of token ids (B, T), B >= 1, T >= 2."""
    torch.manual_seed(seed)
    model = copy.deepcopy(probe).train()
    head = _head(model)
    head.weight = torch.nn.Parameter(head.weight.detach().clone())   # untie from the input embedding
    for p in model.parameters():
        p.requires_grad_(False)
    head.weight.requires_grad_(True)
    opt = torch.optim.AdamW([head.weight], lr=lr, weight_decay=1e-4)
    for _ in range(finetune_epochs):
        for i in range(0, len(batch), micro_batch):
            x = batch[i:i + micro_batch]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    body = [(n, p) for n, p in model.named_parameters() if p is not head.weight and p.ndim >= 1]
    for _, p in body:
        p.requires_grad_(True)
    head.weight.requires_grad_(False)
    fisher = {n: torch.zeros_like(p) for n, p in body}
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    for i in range(0, len(batch), micro_batch):
        x = batch[i:i + micro_batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        with torch.no_grad():
            target = torch.multinomial(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), 1,
                                       generator=gen).view(logits.shape[:-1])
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target)
        model.zero_grad()
        loss.backward()
        for n, p in body:
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
        steps += 1
    parts = [(f / steps).reshape(f.shape[0], -1).mean(1) for f in fisher.values()]   # filter-wise mean
    return torch.cat(parts).double().numpy()


def task2vec_distance(e0: np.ndarray, e1: np.ndarray) -> float:
    """Cosine distance between pairwise-normalised embeddings (Task2Vec's `cosine` distance)."""
    a, b = e0 / (e0 + e1 + 1e-8), e1 / (e0 + e1 + 1e-8)
    return float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def make_batches(token_ids: list[list[int]], n_batches: int, batch_size: int, seq_len: int, seed: int = 0,
                 ) -> list[torch.Tensor]:
    """Batches of `batch_size` sequences of exactly `seq_len` tokens, each batch drawn with seed + index
    from the documents long enough (truncated, never padded: padded positions would get sampled targets)."""
    pool = [t[:seq_len] for t in token_ids if len(t) >= seq_len]
    if len(pool) < batch_size:
        raise ValueError(f"only {len(pool)} documents have >= {seq_len} tokens; need batch_size={batch_size}")
    out = []
    for k in range(n_batches):
        pick = np.random.default_rng(seed + k).choice(len(pool), batch_size, replace=False)
        out.append(torch.tensor([pool[i] for i in pick], dtype=torch.long))
    return out


def diversity_coefficient(probe: Any, batches: list[torch.Tensor], **kw: Any) -> dict[str, float]:
    """Mean and 95% CI half-width of the pairwise Task2Vec distances between batches."""
    if len(batches) < 2:
        raise ValueError("the diversity coefficient needs at least 2 batches")
    embs = [task2vec_embedding(probe, b, seed=k, **kw) for k, b in enumerate(batches)]
    d = np.array([task2vec_distance(embs[i], embs[j]) for i in range(len(embs)) for j in range(i + 1, len(embs))])
    ci = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"div_coeff": float(d.mean()), "ci95": float(ci), "n_pairs": float(len(d))}

"""Diversity coefficient (Lee, Miranda et al., "Beyond Scale", arXiv 2306.13840) with Task2Vec embeddings.

Follows the reference code (alycialee/beyond-scale-language-data-diversity, `diversity/main.py`,
`task2vec.py`, `task_similarity.py`; research note §2) unless an option says otherwise:

* Batches ("tasks") of `batch_size` sequences of `seq_len` tokens: longer documents truncated, shorter ones
  right-padded (the reference's `padding="max_length"`); padded positions never count in a loss.
* A copy of the probe is fine-tuned on the batch: only the output head's parameters are in the optimizer
  (AdamW, lr 5e-5, weight decay 1e-4, eps 1e-8, 10 epochs over the batch's micro-batches of 8, in order,
  train mode). The head stays as the probe has it: GPT-2 and SmolLM2 tie it to the input embedding, so the
  embedding matrix is fine-tuned too (`untie_head=True` gives the head its own copy).
* Diagonal Fisher: for every micro-batch, targets sampled from the model's softmax, the micro-batch's mean
  cross-entropy, its gradient squared; the Fisher is the mean of those squares over the micro-batches.
* Embedding: for every module that has a `weight` except the output head (so LayerNorm/RMSNorm gains are in,
  biases are out), the Fisher of that weight averaged over all but its first axis ("filter-wise"),
  concatenated in module order. A tied head's weight is the input embedding's and appears once, under the
  embedding, whose Fisher then holds the head's gradient too.
* d(B1, B2) = scipy cosine distance after Task2Vec's pairwise normalisation h/(h0 + h1 + 1e-8);
  div(D) = mean over the pairs of batches, reported with the std over pairs (the reference's `std`), the
  t-based 95% half-width (its `ci_0.95`) and the standard error. Pairs share batches, so treating the
  pairwise distances as independent (as the reference does) understates the uncertainty.

Deliberate differences, each an option that restores the reference:
* `target_shift=False`: the target sampled at position t is scored against the logits of position t. The
  reference samples at every position, then applies its one-position input/label shift to the samples, so
  the logits of position t are scored on a token drawn from position t+1's distribution (`True`).
* `fisher_on_padding=False`: padded positions are left out of the Fisher. The reference's only mask there
  is `ignore_index=50256` on the *sampled* tokens, so padded positions count (`True`).
* `fresh_seed_per_batch=True`: batch k is drawn and embedded with seed + k, as the reference `main.py` does;
  its `div_coeff.get_diversity_coefficient` reshuffles with one seed, which makes every batch the same
  (`False`).
* Zero distances are kept: the reference's `stats_of_distance_matrix` drops every 0 entry (meant for the
  diagonal), which would leave nothing for identical batches.

The published values (GPT-2 117M probe, 512 sequences of 128 tokens, 200 batches) are context only: a
different probe, batch size or language moves the coefficient, so local numbers are not comparable to them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from scipy.spatial import distance

# Published values (paper table, as listed in the research note); labelled "published" wherever shown.
PUBLISHED_DIVERSITY = {"C4": 0.2374, "WikiText-103": 0.2140, "The Pile": 0.2463,
                       "lower bound": 0.0525, "upper bound": 0.4037}

Batch = dict[str, torch.Tensor]   # input_ids (B, T) long, attention_mask (B, T) long, right padding
IGNORE = -100


# ------------------------------------------------------------------------------------------- data
def sample_documents(genres: Sequence[str] | np.ndarray, max_docs: int, seed: int = 0,
                     how: str = "uniform") -> np.ndarray:
    """Sorted indices of at most `max_docs` documents (0 = all) of one group, drawn with `seed`.

    "uniform": every document equally likely, so a language's "all" group keeps its genre proportions;
    "balanced": genres in turn (each one shuffled), so each genre gets the same count while it lasts."""
    genres = np.asarray(genres)
    n = len(genres)
    rng = np.random.default_rng(seed)
    if max_docs <= 0 or max_docs >= n:
        return np.arange(n)
    if how == "uniform":
        return np.sort(rng.choice(n, max_docs, replace=False))
    if how != "balanced":
        raise ValueError(f"unknown sampling '{how}': expected uniform or balanced")
    per_genre = [rng.permutation(np.flatnonzero(genres == g)) for g in np.unique(genres)]
    order = [ix[r] for r in range(max(map(len, per_genre))) for ix in per_genre if r < len(ix)]
    return np.sort(np.array(order[:max_docs]))


def make_batches(token_ids: list[list[int]], n_batches: int, batch_size: int, seq_len: int, seed: int = 0,
                 pad_id: int = 0, fresh_seed_per_batch: bool = True) -> list[Batch]:
    """`n_batches` batches of `batch_size` documents each, truncated to `seq_len` tokens and right-padded to
    it with `pad_id` (masked). Batch k is drawn without replacement with seed + k (or with `seed` for every
    batch when `fresh_seed_per_batch` is False, the reference `get_diversity_coefficient`'s behaviour).
    Documents of fewer than 2 tokens are left out: they have no next token to predict."""
    pool = [t[:seq_len] for t in token_ids if len(t) >= 2]
    if len(pool) < batch_size:
        raise ValueError(f"only {len(pool)} documents have >= 2 tokens; need batch_size={batch_size}")
    out = []
    for k in range(n_batches):
        pick = np.random.default_rng(seed + k if fresh_seed_per_batch else seed).choice(
            len(pool), batch_size, replace=False)
        ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
        mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        for row, i in enumerate(pick):
            ids[row, :len(pool[i])] = torch.tensor(pool[i])
            mask[row, :len(pool[i])] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def as_batch(batch: torch.Tensor | Mapping[str, torch.Tensor]) -> Batch:
    """A batch dict; a bare (B, T) tensor of token ids means no padding."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _micro_batches(batch: Batch, micro_batch: int, limit: int = 0) -> list[Batch]:
    n = len(batch["input_ids"])
    out = [{k: v[i:i + micro_batch] for k, v in batch.items()} for i in range(0, n, micro_batch)]
    return out[:limit] if limit > 0 else out


# ------------------------------------------------------------------------------------------- model
def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose next token is real (padding gets -100)."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE)
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE)


def embedded_parameters(model: Any, include_biases: bool = False) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a Task2Vec embedding covers, in module order, each tensor once: the `weight` (and
    with `include_biases` the `bias`) of every module but the output head. A head tied to the input
    embedding is therefore covered once, as the embedding's weight."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the probe has no output head (get_output_embeddings() is None)")
    kinds = ("weight", "bias") if include_biases else ("weight",)
    seen: set[int] = set()
    out = []
    for mname, module in model.named_modules():
        if module is head:
            continue
        for kind in kinds:
            p = module._parameters.get(kind)    # own parameters only, not a submodule's
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append((f"{mname}.{kind}" if mname else kind, p))
    return out


def finetune_head(model: Any, batch: Batch, micro_batch: int = 8, epochs: int = 10, steps: int = 0,
                  lr: float = 5e-5, weight_decay: float = 1e-4, adam_eps: float = 1e-8) -> float:
    """Train the output head's parameters in place (AdamW, micro-batches in order, `steps` per epoch,
    0 = all); returns the last step's loss (NaN with no step)."""
    head = model.get_output_embeddings()
    train = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in train)   # a tied head's gradient still flows back to the input lookup
    opt = torch.optim.AdamW(list(head.parameters()), lr=lr, weight_decay=weight_decay, eps=adam_eps)
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        for mb in _micro_batches(batch, micro_batch, steps):
            loss = lm_loss(model(**mb).logits, mb["input_ids"], mb["attention_mask"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float(loss.detach())


def sample_fisher_targets(logits: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator,
                          target_shift: bool = False, fisher_on_padding: bool = False) -> torch.Tensor:
    """(B, T-1) targets for the logits of positions 0..T-2, drawn from the model's own softmax at every
    position; -100 where not counted."""
    b, t, v = logits.shape
    probs = torch.softmax(logits.detach().float().reshape(-1, v), -1)
    drawn = torch.multinomial(probs, 1, generator=generator).view(b, t)
    target = drawn[:, 1:] if target_shift else drawn[:, :-1]
    if not fisher_on_padding:
        target = target.masked_fill(attention_mask[:, 1:] == 0, IGNORE)
    return target


def fisher_diagonal(model: Any, batch: Batch, params: list[tuple[str, torch.nn.Parameter]],
                    micro_batch: int = 8, fisher_batches: int = 0, generator: torch.Generator | None = None,
                    target_shift: bool = False, fisher_on_padding: bool = False,
                    targets: list[torch.Tensor] | None = None,
                    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Monte-Carlo diagonal Fisher of `params`: the mean over micro-batches (`fisher_batches`, 0 = all) of
    the squared gradient of each micro-batch's mean cross-entropy on sampled targets (or the given
    `targets`, one (b, T-1) tensor per micro-batch). Returns the Fisher per name and the targets used."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    wanted = {id(p) for _, p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in wanted)   # no gradient work for what the embedding leaves out
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}   # float32, as the reference
    used = []
    mbs = _micro_batches(batch, micro_batch, fisher_batches)
    try:
        for m, mb in enumerate(mbs):
            logits = model(**mb).logits.float()
            tgt = (sample_fisher_targets(logits, mb["attention_mask"], generator, target_shift,
                                         fisher_on_padding) if targets is None else targets[m])
            used.append(tgt)
            loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, ignore_index=IGNORE)
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            for (n, _), g in zip(params, grads, strict=True):
                if g is not None:
                    fisher[n] += g.float().square()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return {n: f / max(len(mbs), 1) for n, f in fisher.items()}, used


def filterwise(fisher: dict[str, torch.Tensor]) -> np.ndarray:
    """Concatenated filter-wise means: each tensor averaged over all but its first axis."""
    return torch.cat([f.double().reshape(f.shape[0], -1).mean(1) for f in fisher.values()]).numpy()


def task2vec_embedding(probe: Any, batch: torch.Tensor | Mapping[str, torch.Tensor], seed: int = 0,
                       micro_batch: int = 8, finetune_epochs: int = 10, finetune_steps: int = 0,
                       lr: float = 5e-5, weight_decay: float = 1e-4, adam_eps: float = 1e-8,
                       fisher_batches: int = 0, untie_head: bool = False, include_biases: bool = False,
                       target_shift: bool = False, fisher_on_padding: bool = False) -> np.ndarray:
    """Task2Vec embedding (float64 vector) of one batch (B, T), T >= 2; the probe itself is not changed."""
    batch = as_batch(batch)
    torch.manual_seed(seed)                 # dropout (the reference keeps the probe in train mode)
    model = copy.deepcopy(probe).train()
    if untie_head:
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    if finetune_epochs > 0:
        finetune_head(model, batch, micro_batch, finetune_epochs, finetune_steps, lr, weight_decay, adam_eps)
    fisher, _ = fisher_diagonal(model, batch, embedded_parameters(model, include_biases), micro_batch,
                                fisher_batches, torch.Generator().manual_seed(seed), target_shift,
                                fisher_on_padding)
    return filterwise(fisher)


def task2vec_distance(e0: np.ndarray, e1: np.ndarray) -> float:
    """Cosine distance between pairwise-normalised embeddings (Task2Vec's `cosine` distance)."""
    return float(distance.cosine(e0 / (e0 + e1 + 1e-8), e1 / (e0 + e1 + 1e-8)))


def distance_stats(d: np.ndarray) -> dict[str, float]:
    """Mean of the pairwise distances with the reference's spreads: `std` (numpy's, ddof 0) and the t-based
    95% half-width `ci95`; `se` is the standard error of the mean."""
    n = len(d)
    se = float(stats.sem(d)) if n > 1 else float("nan")
    ci = float(se * stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")
    return {"div_coeff": float(d.mean()), "std": float(d.std()), "se": se, "ci95": ci, "n_pairs": float(n)}


def diversity_coefficient(probe: Any, batches: Sequence[torch.Tensor | Mapping[str, torch.Tensor]],
                          seed: int = 0, fresh_seed_per_batch: bool = True, **opts: Any) -> dict[str, float]:
    """Mean pairwise Task2Vec distance between the batches' embeddings, with its spread (`distance_stats`).
    Batch k is embedded with seed + k (or `seed` when `fresh_seed_per_batch` is False); `opts` go to
    `task2vec_embedding`."""
    if len(batches) < 2:
        raise ValueError("the diversity coefficient needs at least 2 batches")
    embs = [task2vec_embedding(probe, b, seed=seed + k if fresh_seed_per_batch else seed, **opts)
            for k, b in enumerate(batches)]
    d = np.array([task2vec_distance(embs[i], embs[j]) for i in range(len(embs)) for j in range(i + 1, len(embs))])
    return distance_stats(d)

"""Training and evaluating one prompt learner on cached image features (the image tower is frozen, so its
features are computed once per image; CoOp's random-resized-crop augmentation is therefore off here).

Methods: ``zeroshot`` (hand prompt), ``coop``, ``cocoop``, ``kgcoop``, each with ``_plpp`` (PLPP's losses
added to the method's own). Optimiser as CoOp: SGD (momentum 0.9, weight decay 5e-4), cosine schedule after
one warm-up epoch at a constant 1e-5.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from exp_plpp.model import VisionLanguageModel
from exp_plpp.plpp import PLPPConfig, context_states, plpp_loss
from exp_plpp.prompts import PromptConfig, PromptLearner, encode_prompts, hand_prompt_features

BASE_METHODS = ("zeroshot", "coop", "cocoop", "kgcoop")


@dataclass
class LearnConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.2                 # CoOp's 0.002 is for CLIP; on MiniLM's embeddings the training CE is still
                                    # falling after 20 epochs at 0.002-0.02 (README: chosen on training loss)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1          # constant warm-up LR for this many epochs (CoOp: 1 epoch at 1e-5)
    warmup_lr: float = 1e-5
    cocoop_batch_size: int = 4      # CoCoOp encodes n_cls prompts per image: its batches are small (paper: 1)
    cocoop_epochs: int = 5
    kgcoop_weight: float = 8.0      # KgCoOp's w (base2new_train.sh)
    eval_chunk: int = 32            # CoCoOp evaluation: images per text-encoder call

    def validate(self) -> None:
        if self.epochs < 1 or self.cocoop_epochs < 1 or self.batch_size < 1 or self.cocoop_batch_size < 1:
            raise ValueError("learn: epochs, cocoop_epochs, batch sizes must be >= 1")
        if self.lr <= 0:
            raise ValueError("learn.lr must be > 0")


def parse_method(method: str) -> tuple[str, bool]:
    """'coop_plpp' -> ('coop', True)."""
    base, plpp = (method[:-5], True) if method.endswith("_plpp") else (method, False)
    if base not in BASE_METHODS or (base == "zeroshot" and plpp):
        raise ValueError(f"unknown method '{method}': one of {', '.join(BASE_METHODS)}, optionally with '_plpp' "
                         f"(not for zeroshot)")
    return base, plpp


def _lr_at(epoch_float: float, epochs: int, cfg: LearnConfig) -> float:
    if epoch_float < cfg.warmup_epochs and epochs > cfg.warmup_epochs:
        return cfg.warmup_lr
    span = max(1e-9, epochs - (cfg.warmup_epochs if epochs > cfg.warmup_epochs else 0))
    done = epoch_float - (cfg.warmup_epochs if epochs > cfg.warmup_epochs else 0)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, done / span)))


def _class_invariant_context(model: VisionLanguageModel, learner: PromptLearner) -> bool:
    """Causal text encoder, class name after the context, shared context: the context states are the same
    for every class, so PLPP's LM head needs one prompt row (plpp.md §1.4's cost trick)."""
    return model.causal and learner.cfg.class_token_position == "end" and not learner.cfg.csc


def class_logits(model: VisionLanguageModel, learner: PromptLearner, image_features: torch.Tensor,
                 base: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (B, n_cls), hidden states, context used, normalised text features) for normalised image
    features (B, D). CoCoOp: one prompt set per image (hidden (B * n_cls, L, d))."""
    scale = model.logit_scale.exp()
    if base == "cocoop":
        ctx = learner.context(image_features)                      # (B, M, d)
        B = ctx.shape[0]
        embeds = torch.cat([learner.assemble(ctx[b]) for b in range(B)])
        n = learner.n_cls
        hidden, feats = model.encode_text_embeddings(embeds, learner.attention_mask.repeat(B, 1),
                                                     learner.pool_index.repeat(B))
        txt = F.normalize(feats, dim=-1).view(B, n, -1)
        logits = scale * torch.einsum("bd,bcd->bc", image_features, txt)
        return logits, hidden, ctx, txt
    ctx = learner.context()
    hidden, txt = encode_prompts(model, learner, ctx)
    return scale * image_features @ txt.T, hidden, ctx, txt


def plpp_term(model: VisionLanguageModel, learner: PromptLearner, hidden: torch.Tensor, ctx: torch.Tensor,
              cfg: PLPPConfig, base: str) -> tuple[torch.Tensor, dict]:
    """PLPP's loss for one batch: the LM-head states at the context positions of the prompts just encoded
    (one row per image for CoCoOp; one row in all when the context states are class-invariant)."""
    E = model.token_embedding.weight
    positions = learner.context_positions()                          # (n_cls, M)
    if base == "cocoop":   # rows = B x n_cls prompts; each image's context repeated over its classes
        B = ctx.shape[0]
        positions = positions.repeat(B, 1)
        ctx_rows = ctx.repeat_interleave(learner.n_cls, dim=0)
        if _class_invariant_context(model, learner):  # one row per image
            hidden = hidden[::learner.n_cls]
            positions, ctx_rows = positions[::learner.n_cls], ctx
        return plpp_loss(ctx_rows, context_states(hidden, positions, cfg.position), E, cfg)
    if _class_invariant_context(model, learner):
        hidden, positions = hidden[:1], positions[:1]
    return plpp_loss(ctx, context_states(hidden, positions, cfg.position), E, cfg)


def train_prompts(model: VisionLanguageModel, features: torch.Tensor, labels: torch.Tensor, classnames: list[str],
                  template: str, method: str, prompt_cfg: PromptConfig, plpp_cfg: PLPPConfig, cfg: LearnConfig,
                  seed: int) -> tuple[PromptLearner | None, list[dict]]:
    """Learn prompts on normalised image ``features`` (N, D) with ``labels``; returns the learner (None for
    zero-shot) and one record per epoch (loss = the objective, ce, kg, l_ppl, l_inv means, seconds)."""
    cfg.validate()
    base, use_plpp = parse_method(method)
    if base == "zeroshot":
        return None, []
    torch.manual_seed(seed)
    meta_dim = features.shape[1] if base == "cocoop" else None
    learner = PromptLearner(model, classnames, prompt_cfg, meta_dim=meta_dim)
    hand = hand_prompt_features(model, classnames, template) if base == "kgcoop" else None
    params = [p for p in learner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    epochs = cfg.cocoop_epochs if base == "cocoop" else cfg.epochs
    bs = cfg.cocoop_batch_size if base == "cocoop" else cfg.batch_size
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    steps = max(1, math.ceil(n / bs))
    history = []
    for epoch in range(epochs):
        t0, sums = time.perf_counter(), {"loss": 0.0, "ce": 0.0, "kg": 0.0, "l_ppl": 0.0, "l_inv": 0.0}
        order = torch.randperm(n, generator=gen)
        for b in range(steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(epoch + b / steps, epochs, cfg)
            idx = order[b * bs:(b + 1) * bs]
            logits, hidden, ctx, txt = class_logits(model, learner, features[idx], base)
            loss = F.cross_entropy(logits, labels[idx])
            sums["ce"] += float(loss.detach())
            if hand is not None:   # KgCoOp: stay near the hand-crafted class features
                kg = 1 - (txt * hand).sum(-1).mean()
                loss = loss + cfg.kgcoop_weight * kg
                sums["kg"] += float(kg.detach())
            if use_plpp:
                reg, st = plpp_term(model, learner, hidden, ctx, plpp_cfg, base)
                loss = loss + reg
                for k, v in st.items():
                    sums[k] += v
            sums["loss"] += float(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history.append({"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()},
                        "seconds": time.perf_counter() - t0})
    return learner.eval(), history


def transfer(model: VisionLanguageModel, learner: PromptLearner, classnames: list[str]) -> PromptLearner:
    """The learned context (and meta-net) on new class names: base -> novel, cross-dataset."""
    if learner.cfg.csc:
        raise ValueError("class-specific context (csc=true) cannot be transferred to other classes")
    new = PromptLearner(model, classnames, copy.deepcopy(learner.cfg),
                        meta_dim=None if learner.meta_net is None else learner.meta_net[0].in_features)
    new.load_state_dict(learner.state_dict(), strict=False)   # ctx and meta_net; buffers are the new classes'
    return new.eval()


@torch.no_grad()
def evaluate(model: VisionLanguageModel, learner: PromptLearner | None, features: torch.Tensor,
             labels: torch.Tensor, classnames: list[str], template: str, method: str, chunk: int = 32) -> float:
    """Top-1 accuracy on normalised image features with these class names (the learner transferred to them
    when they are not its own)."""
    base, _ = parse_method(method)
    if learner is None:
        txt = hand_prompt_features(model, classnames, template)
        return float(((features @ txt.T).argmax(1) == labels).float().mean())
    if list(classnames) != learner.classnames:
        learner = transfer(model, learner, classnames)
    if base != "cocoop":
        logits, *_ = class_logits(model, learner, features, base)
        return float((logits.argmax(1) == labels).float().mean())
    correct = 0
    for i in range(0, len(labels), chunk):
        logits, *_ = class_logits(model, learner, features[i:i + chunk], base)
        correct += int((logits.argmax(1) == labels[i:i + chunk]).sum())
    return correct / max(1, len(labels))

"""Prompt learners of the CoOp family on a frozen ``VisionLanguageModel``.

CoOp (Zhou et al., IJCV 2022; code KaiyangZhou/CoOp ``trainers/coop.py``): M learnable context vectors
replace the word embeddings of a placeholder prefix; the class name, "." and EOS stay fixed. Class token
``end`` / ``middle`` / ``front``; one shared context or one per class (CSC).
CoCoOp (CVPR 2022, ``trainers/cocoop.py``): a meta-net (Linear-ReLU-Linear, width D/16) maps each image's
feature to a bias added to every context vector, so each image gets its own class prompts.
KgCoOp (CVPR 2023): CoOp + w * (1 - cos(learned class features, hand-crafted class features)).

Everything is built from token embeddings once: ``prefix`` (BOS), ``suffix`` (class tokens, ".", EOS,
padding) are buffers, only ``ctx`` (and the meta-net) learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from exp_plpp.model import VisionLanguageModel


@dataclass
class PromptConfig:
    n_ctx: int = 4
    ctx_init: str = "a photo of a"   # "" = random N(0, 0.02) vectors (CoOp's default); else their embeddings
    class_token_position: str = "end"   # end | middle | front
    csc: bool = False                # class-specific context
    init_std: float = 0.02

    def validate(self) -> None:
        if self.class_token_position not in ("end", "middle", "front"):
            raise ValueError(f"prompt.class_token_position must be end|middle|front, got "
                             f"'{self.class_token_position}'")
        if self.n_ctx < 1:
            raise ValueError("prompt.n_ctx must be >= 1")


class PromptLearner(nn.Module):
    """Learned context + fixed class-name embeddings -> prompt embeddings (n_cls, L, d)."""

    def __init__(self, model: VisionLanguageModel, classnames: list[str], cfg: PromptConfig,
                 meta_dim: int | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.classnames = list(classnames)
        first = model.first_text_position
        emb = model.token_embedding
        ctx_vectors = self._init_context(model, cfg, len(classnames))
        n_ctx = ctx_vectors.shape[-2]
        placeholder = cfg.ctx_init or " ".join(["X"] * n_ctx)   # its tokens are replaced by the context
        tok = model.tokenize([f"{placeholder} {name}." for name in classnames])
        with torch.no_grad():
            full = emb(tok.input_ids)
        self.register_buffer("prefix", full[:, :first].clone(), persistent=False)
        self.register_buffer("suffix", full[:, first + n_ctx:].clone(), persistent=False)
        self.register_buffer("attention_mask", tok.attention_mask, persistent=False)
        self.register_buffer("pool_index", tok.pool_index, persistent=False)
        # class-name length in tokens (middle/front need it): tokenise the names alone, minus BOS/EOS
        name_tok = model.tokenize(list(classnames))
        self.name_lengths = (name_tok.attention_mask.sum(1) - first - 1).tolist()
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx_vectors)
        self.first = first
        self.meta_net = None
        if meta_dim is not None:   # CoCoOp
            hidden = max(1, meta_dim // 16)
            self.meta_net = nn.Sequential(nn.Linear(meta_dim, hidden), nn.ReLU(inplace=True),
                                          nn.Linear(hidden, model.width))

    @staticmethod
    def _init_context(model: VisionLanguageModel, cfg: PromptConfig, n_cls: int) -> torch.Tensor:
        d = model.width
        if cfg.ctx_init:
            tok = model.tokenize([cfg.ctx_init])
            n = int(tok.attention_mask.sum()) - model.first_text_position - 1   # words of the init, no BOS/EOS
            with torch.no_grad():
                vec = model.token_embedding(tok.input_ids[0, model.first_text_position:model.first_text_position + n])
            vec = vec.clone()
            return vec.unsqueeze(0).repeat(n_cls, 1, 1) if cfg.csc else vec
        shape = (n_cls, cfg.n_ctx, d) if cfg.csc else (cfg.n_ctx, d)
        return torch.randn(shape) * cfg.init_std

    @property
    def n_cls(self) -> int:
        return len(self.classnames)

    def context(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """The context vectors: (M, d) or (n_cls, M, d); with CoCoOp image features (B, D): (B, M, d)."""
        if self.meta_net is None or image_features is None:
            return self.ctx
        return self.ctx.unsqueeze(0) + self.meta_net(image_features).unsqueeze(1)

    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings (n_cls, L, d) from context (M, d) or (n_cls, M, d)."""
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        pos = self.cfg.class_token_position
        if pos == "end":
            return torch.cat([self.prefix, ctx, self.suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for i, n in enumerate(self.name_lengths):
            name, rest = self.suffix[i:i + 1, :n], self.suffix[i:i + 1, n:]
            c = ctx[i:i + 1]
            parts = [self.prefix[i:i + 1], c[:, :half], name, c[:, half:], rest] if pos == "middle" else \
                [self.prefix[i:i + 1], name, c, rest]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)

    def context_positions(self) -> torch.Tensor:
        """(n_cls, M): the position of context vector m in each class's prompt (PLPP's LM head reads these)."""
        m = torch.arange(self.n_ctx)
        base = torch.full((self.n_cls, self.n_ctx), self.first)
        if self.cfg.class_token_position == "end":
            return base + m
        lengths = torch.tensor(self.name_lengths).unsqueeze(1)
        if self.cfg.class_token_position == "front":
            return base + lengths + m
        half = self.n_ctx // 2
        return base + m + torch.where(m >= half, lengths, torch.zeros_like(lengths))


def encode_prompts(model: VisionLanguageModel, learner: PromptLearner,
                   ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (n_cls, L, d), normalised class text features (n_cls, D)) for one context."""
    hidden, feats = model.encode_text_embeddings(learner.assemble(ctx), learner.attention_mask, learner.pool_index)
    return hidden, F.normalize(feats, dim=-1)


def hand_prompt_features(model: VisionLanguageModel, classnames: list[str], template: str) -> torch.Tensor:
    """Normalised text features of hand-crafted prompts (zero-shot CLIP; KgCoOp's reference)."""
    return F.normalize(model.encode_text([template.format(c) for c in classnames]), dim=-1)

"""PLPP's perplexity self-distillation (arXiv 2412.15277), as reconstructed in ../shared/research/plpp.md §1.4.

Two distributions over the vocabulary at each context position m:
* the *cosine labels* q_m: cosine similarity between the context vector t_m and every row of the frozen
  token-embedding matrix E ([read] step (a)), as a hard argmax or a top-k softmax with temperature tau;
* the *LM head* p_m: the text encoder's hidden state at the context position (after the final norm, before
  the projection) times E^T ([read] step (b): a head that is never trained).
L_ppl = CE(q -> p) (the labels teach the LM head: the log-perplexity of the prompt); L_inv = CE(p -> q)
("inverted perplexity": the LM head teaches the labels); the teacher of each term is detached by default.
Top-k: both terms are computed on k entries only (the teacher's top-k; the student renormalised over the
same k), which is the abstract's "reduce the additional computation" [inferred].

Which state predicts which label is not stated: ``position="same"`` reads the state at t_m's own position
(denoising reading, default), ``"next"`` the state one position before (a causal next-token LM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PLPPConfig:
    label_mode: str = "soft"     # soft (top-k softmax, arXiv version) | hard (argmax, ICLR version)
    k: int = 8                   # top-k of the soft labels (1 = hard)
    tau: float = 0.01            # temperature of the cosine labels: cosines lie in [-1, 1], so tau = 1 is ~uniform
    lm_tau: float = 1.0          # temperature of the LM head's logits h E^T
    position: str = "same"       # same | next
    detach_teacher: bool = True
    use_inverted: bool = True
    lambda_ppl: float = 0.1      # unknown in the paper; 0.1 = the smallest of plpp.md's grid {0.1, 0.5, 1, 2}:
    lambda_inv: float = 0.1      # at 1 the two terms end ~5x the CE on the training shots and CE stalls
    full_vocab_student: bool = False   # student log-probs over the whole vocabulary instead of the top-k

    def validate(self) -> None:
        if self.label_mode not in ("soft", "hard"):
            raise ValueError(f"plpp.label_mode must be soft|hard, got '{self.label_mode}'")
        if self.position not in ("same", "next"):
            raise ValueError(f"plpp.position must be same|next, got '{self.position}'")
        if self.k < 1 or self.tau <= 0 or self.lm_tau <= 0:
            raise ValueError("plpp: k >= 1, tau > 0 and lm_tau > 0 are required")


def cosine_scores(ctx: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """s[..., m, v] = cos(t_m, E_v) for context vectors (..., M, d) and E (V, d)."""
    return F.normalize(ctx, dim=-1) @ F.normalize(embedding, dim=-1).T


def topk_soft_labels(scores: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (..., k), probabilities (..., k)): softmax(s / tau) over the top-k entries; sums to 1; at
    k = 1 it is the hard argmax label with probability 1."""
    vals, idx = scores.topk(k, dim=-1)
    return idx, F.softmax(vals / tau, dim=-1)


def lm_head_logits(hidden: torch.Tensor, embedding: torch.Tensor, lm_tau: float = 1.0) -> torch.Tensor:
    """The training-free LM head: h E^T (E frozen: no gradient reaches it when it does not require one)."""
    return hidden @ embedding.T / lm_tau


def _soft_ce(teacher: torch.Tensor, student_logits_k: torch.Tensor) -> torch.Tensor:
    return -(teacher * F.log_softmax(student_logits_k, dim=-1)).sum(-1).mean()


def context_states(hidden: torch.Tensor, positions: torch.Tensor, position: str) -> torch.Tensor:
    """Hidden states read by the LM head: (n_rows, M, d) from hidden (n_rows, L, d) and positions (n_rows, M)."""
    pos = positions - 1 if position == "next" else positions
    return hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def plpp_loss(ctx: torch.Tensor, states: torch.Tensor, embedding: torch.Tensor,
              cfg: PLPPConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """lambda_ppl * L_ppl + lambda_inv * L_inv for context vectors ``ctx`` (M, d) or (R, M, d) and LM-head
    states ``states`` (R, M, d) (R rows: one per class prompt, or one when the encoder is causal)."""
    cfg.validate()
    k = 1 if cfg.label_mode == "hard" else cfg.k
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(states.shape[0], -1, -1)
    s = cosine_scores(ctx, embedding)                         # (R, M, V)
    z = lm_head_logits(states, embedding, cfg.lm_tau)          # (R, M, V)
    idx, q = topk_soft_labels(s, k, cfg.tau)
    if cfg.detach_teacher:
        q = q.detach()
    if cfg.full_vocab_student:
        logp = F.log_softmax(z, dim=-1).gather(-1, idx)
        l_ppl = -(q * logp).sum(-1).mean()
    else:
        l_ppl = _soft_ce(q, z.gather(-1, idx))
    total = cfg.lambda_ppl * l_ppl
    stats = {"l_ppl": float(l_ppl)}
    if cfg.use_inverted:
        z_top, idx_lm = z.topk(k, dim=-1)
        p = F.softmax(z_top, dim=-1)
        if cfg.detach_teacher:
            p = p.detach()
        l_inv = _soft_ce(p, s.gather(-1, idx_lm) / cfg.tau)
        total = total + cfg.lambda_inv * l_inv
        stats["l_inv"] = float(l_inv)
    return total, stats

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
    full_vocab_student: bool = False   # student log-probs over the whole vocabulary (always at k = 1)
    sparse_topk: bool = True     # detached teachers + top-k students: differentiate k entries, not (R, M, V)

    def validate(self) -> None:
        if self.label_mode not in ("soft", "hard"):
            raise ValueError(f"plpp.label_mode must be soft|hard, got '{self.label_mode}'")
        if self.position not in ("same", "next"):
            raise ValueError(f"plpp.position must be same|next, got '{self.position}'")
        if self.k < 1 or self.tau <= 0 or self.lm_tau <= 0:
            raise ValueError("plpp: k >= 1, tau > 0 and lm_tau > 0 are required")


_UNIT_ROWS: dict[tuple, torch.Tensor] = {}


def _unit_rows(embedding: torch.Tensor) -> torch.Tensor:
    """E with unit-norm rows, cached while E is frozen and unchanged (it is normalised once, not per step)."""
    if embedding.requires_grad:
        return F.normalize(embedding, dim=-1)
    key = (embedding.data_ptr(), tuple(embedding.shape), embedding._version, embedding.dtype)
    if key not in _UNIT_ROWS:
        _UNIT_ROWS.clear()
        _UNIT_ROWS[key] = F.normalize(embedding, dim=-1)
    return _UNIT_ROWS[key]


def cosine_scores(ctx: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """s[..., m, v] = cos(t_m, E_v) for context vectors (..., M, d) and E (V, d)."""
    return F.normalize(ctx, dim=-1) @ _unit_rows(embedding).T


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


def _rows(t: torch.Tensor, n_rows: int, shared: bool) -> torch.Tensor:
    """A shared context's (M, ...) tensor as (R, M, ...) (a view); per-row tensors unchanged."""
    return t.unsqueeze(0).expand(n_rows, *t.shape) if shared else t


def _sparse_topk_loss(ctx: torch.Tensor, states: torch.Tensor, embedding: torch.Tensor, cfg: PLPPConfig,
                      k: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The default path: both teachers are detached, so their top-k are found without autograd, and each
    student is evaluated at its teacher's k tokens only: no (R, M, V) tensor enters the backward graph."""
    R, shared = states.shape[0], ctx.dim() == 2
    unit = _unit_rows(embedding)
    ctx_unit = F.normalize(ctx, dim=-1)
    with torch.no_grad():
        vals, idx = (ctx_unit @ unit.T).topk(k, dim=-1)                        # cosine labels' top-k
        q = F.softmax(vals / cfg.tau, dim=-1)
        z_top, idx_lm = lm_head_logits(states, embedding, cfg.lm_tau).topk(k, dim=-1)   # LM head's top-k
        p = F.softmax(z_top, dim=-1)
    idx, q = _rows(idx, R, shared), _rows(q, R, shared)
    z_k = torch.einsum("rmd,rmkd->rmk", states, embedding[idx]) / cfg.lm_tau   # the LM head at those k tokens
    l_ppl = _soft_ce(q, z_k)
    total = cfg.lambda_ppl * l_ppl
    stats = {"l_ppl": float(l_ppl.detach())}
    if cfg.use_inverted:
        s_k = torch.einsum("rmd,rmkd->rmk", _rows(ctx_unit, R, shared), unit[idx_lm]) / cfg.tau
        l_inv = _soft_ce(p, s_k)
        total = total + cfg.lambda_inv * l_inv
        stats["l_inv"] = float(l_inv.detach())
    return total, stats


def plpp_loss(ctx: torch.Tensor, states: torch.Tensor, embedding: torch.Tensor,
              cfg: PLPPConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """lambda_ppl * L_ppl + lambda_inv * L_inv for context vectors ``ctx`` (M, d) or (R, M, d) and LM-head
    states ``states`` (R, M, d) (R rows: one per class prompt, or one when the encoder is causal)."""
    cfg.validate()
    k = 1 if cfg.label_mode == "hard" else cfg.k
    # at k = 1 a student renormalised over its single entry has loss 0: the hard (ICLR) loss is the CE over
    # the whole vocabulary
    full = cfg.full_vocab_student or k == 1
    if cfg.sparse_topk and cfg.detach_teacher and not full:
        return _sparse_topk_loss(ctx, states, embedding, cfg, k)
    s = cosine_scores(ctx, embedding)                          # (M, V) for a shared context, else (R, M, V)
    idx, q = topk_soft_labels(s, k, cfg.tau)
    if s.dim() == 2:   # one context for every row: its labels are computed once, then broadcast (views)
        R = states.shape[0]
        s, idx, q = (t.unsqueeze(0).expand(R, *t.shape) for t in (s, idx, q))
    z = lm_head_logits(states, embedding, cfg.lm_tau)          # (R, M, V)
    if cfg.detach_teacher:
        q = q.detach()
    if full:
        l_ppl = -(q * F.log_softmax(z, dim=-1).gather(-1, idx)).sum(-1).mean()
    else:
        l_ppl = _soft_ce(q, z.gather(-1, idx))
    total = cfg.lambda_ppl * l_ppl
    stats = {"l_ppl": float(l_ppl.detach())}
    if cfg.use_inverted:
        z_top, idx_lm = z.topk(k, dim=-1)
        p = F.softmax(z_top, dim=-1)
        if cfg.detach_teacher:
            p = p.detach()
        if full:
            l_inv = -(p * F.log_softmax(s / cfg.tau, dim=-1).gather(-1, idx_lm)).sum(-1).mean()
        else:
            l_inv = _soft_ce(p, s.gather(-1, idx_lm) / cfg.tau)
        total = total + cfg.lambda_inv * l_inv
        stats["l_inv"] = float(l_inv.detach())
    return total, stats

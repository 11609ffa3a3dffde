"""Small random-init transformers and the weight interventions the round-off experiments sweep.

All models are transformers classes (GPT-2 / Llama / OPT via ``common.models.build_causal_lm``) in float64,
eval mode, so the tracer's reference is exact float64 arithmetic.
"""

from __future__ import annotations

import math

import torch

from common.lowp.tracer import _find_layers
from common.models import build_causal_lm


def build_model(arch: str, vocab_size: int = 256, d_model: int = 64, n_layers: int = 4, n_heads: int = 4,
                seq_len: int = 128, init_std: float = 0.02, n_kv_heads: int | None = None,
                norm: str | None = None, norm_eps: float | None = None, seed: int | None = None) -> torch.nn.Module:
    """A float64 random-init causal LM. ``norm`` ("layernorm" / "rmsnorm") swaps every norm module;
    ``init_std`` is the transformers initializer_range (std of every weight matrix)."""
    if seed is not None:
        torch.manual_seed(seed)
    extra: dict = {"initializer_range": init_std}
    if arch == "llama" and n_kv_heads:
        extra["n_kv_heads"] = n_kv_heads
    model = build_causal_lm(arch, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                            max_seq_len=seq_len, **extra)
    model = model.double().eval()
    if norm is not None or norm_eps is not None:
        swap_norms(model, norm, norm_eps)
    return model


class RMSNorm(torch.nn.Module):
    """RMSNorm (Llama's formula, float64 throughout); the tracer recognises it by its class name."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d, dtype=torch.float64))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def swap_norms(model: torch.nn.Module, kind: str | None, eps: float | None) -> None:
    """Replace every LayerNorm/RMSNorm by ``kind`` (None: keep the kind) with epsilon ``eps``."""
    for name, mod in list(model.named_modules()):
        cls = type(mod).__name__
        is_ln = isinstance(mod, torch.nn.LayerNorm)
        if not (is_ln or cls.endswith("RMSNorm")):
            continue
        d = mod.weight.shape[0]
        cur_eps = getattr(mod, "eps", getattr(mod, "variance_epsilon", 1e-5))
        new_eps = cur_eps if eps is None else eps
        target = kind or ("layernorm" if is_ln else "rmsnorm")
        if target == "layernorm":
            new = torch.nn.LayerNorm(d, eps=new_eps, dtype=torch.float64)
        elif target == "rmsnorm":
            new = RMSNorm(d, new_eps)
        else:
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _attn(block: torch.nn.Module) -> torch.nn.Module:
    return getattr(block, "self_attn", None) or block.attn


@torch.no_grad()
def scale_qk(model: torch.nn.Module, s: float) -> None:
    """Multiply W_q (and its bias) by ``s``: W_q^T W_k and the attention logits scale by ``s``."""
    for block in _find_layers(model)[1]:
        attn = _attn(block)
        if hasattr(attn, "c_attn"):
            d = attn.c_attn.weight.shape[0]
            attn.c_attn.weight[:, :d] *= s
            attn.c_attn.bias[:d] *= s
        else:
            attn.q_proj.weight *= s
            if attn.q_proj.bias is not None:
                attn.q_proj.bias *= s


@torch.no_grad()
def scale_residual_projections(model: torch.nn.Module, s: float) -> None:
    """Multiply the residual-branch output projections (attention out, MLP down) and biases by ``s``:
    the blocks compute x + s*attn(norm(x)) and x + s*mlp(norm(x)) (the authors' residual-scale experiment)."""
    for block in _find_layers(model)[1]:
        attn = _attn(block)
        mods = [getattr(attn, n) for n in ("c_proj", "o_proj", "out_proj") if hasattr(attn, n)]
        mlp = getattr(block, "mlp", block)
        mods += [getattr(mlp, n) for n in ("c_proj", "down_proj", "fc2") if hasattr(mlp, n)]
        for m in mods:
            m.weight *= s
            if getattr(m, "bias", None) is not None:
                m.bias *= s


@torch.no_grad()
def add_massive_outlier(model: torch.nn.Module, magnitude: float, dims: tuple[int, ...] = (0,)) -> None:
    """Add ``magnitude`` to a few residual-stream coordinates of every token embedding: a massive activation
    that makes every norm input mean-dominated (LayerNorm's ill-conditioned regime)."""
    emb = model.get_input_embeddings()
    for d in dims:
        emb.weight[:, d] += magnitude


def init_scale_factor(init_std: float, d_model: int) -> float:
    """init_std * sqrt(d_model): the gain of one random linear map at that init (1 = norm preserving)."""
    return init_std * math.sqrt(d_model)

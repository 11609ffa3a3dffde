"""Small random-init transformers and the weight interventions the round-off experiments sweep.

All models are transformers classes (GPT-2 / Llama / OPT via ``common.models.build_causal_lm``) in float64,
eval mode, so the tracer's reference is exact float64 arithmetic.
"""

from __future__ import annotations

import copy
import math

import torch

from common.lowp.tracer import Policy, Tracer, find_layers
from common.models import build_causal_lm


def build_model(arch: str, vocab_size: int = 256, d_model: int = 64, n_layers: int = 4, n_heads: int = 4,
                seq_len: int = 128, init_std: float = 0.02, n_kv_heads: int | None = None,
                norm: str | None = None, norm_eps: float | None = None, seed: int | None = None,
                attention_bias: bool = False) -> torch.nn.Module:
    """A float64 random-init causal LM. ``norm`` ("layernorm" / "rmsnorm") swaps every norm module;
    ``init_std`` is the transformers initializer_range (std of every weight matrix); ``attention_bias``
    gives Llama's q/k/v/o projections (zero-initialised) biases (GPT-2 and OPT always have them)."""
    if seed is not None:
        torch.manual_seed(seed)
    extra: dict = {"initializer_range": init_std}
    if arch == "llama" and n_kv_heads:
        extra["n_kv_heads"] = n_kv_heads
    if arch == "llama" and attention_bias:
        extra["attention_bias"] = True
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
    for block in find_layers(model)[1]:
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
    for block in find_layers(model)[1]:
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


# ------------------------------------------------------------------------------------- attention sinks
def _head_dim(model: torch.nn.Module) -> int:
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _sink_direction(d: int, seed: int) -> torch.Tensor:
    """A random unit direction orthogonal to the all-ones vector (so LayerNorm's centring keeps it)."""
    w = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = w - w.mean()
    return w / w.norm()


@torch.no_grad()
def _mark_sink_position(model: torch.nn.Module, w: torch.Tensor, massive: float) -> None:
    """Give position 0 a massive activation ``massive * w`` and remove w from every other embedding, so that
    after any norm token 0 is ~ sqrt(d) w while the other tokens have (almost) no component along w.
    GPT-2: position embedding 0 (its token embeddings are tied to the LM head, so they stay untouched);
    Llama (no position embeddings): token 0, which the sink experiments use as BOS at position 0."""
    if hasattr(model, "transformer") and hasattr(model.transformer, "wpe"):  # GPT-2
        tables, row = [model.transformer.wte.weight, model.transformer.wpe.weight], model.transformer.wpe.weight[0]
    elif type(model).__name__.startswith("Llama"):
        emb = model.get_input_embeddings().weight
        tables, row = [emb], emb[0]
    else:
        raise ValueError(f"add_attention_sink: {type(model).__name__} not supported (GPT-2 and Llama are)")
    for t in tables:
        t -= torch.outer(t @ w, w)
    row += massive * w


@torch.no_grad()
def add_attention_sink(model: torch.nn.Module, strength: float, massive: float = 100.0, query: float = 1.0,
                       seed: int = 0) -> None:
    """Make token 0 an attention sink in every head, through the weights only (the q.k GEMM produces the logit).

    * a massive activation ``massive * w`` at position 0 (``_mark_sink_position``): after the pre-norm,
      token 0 is ~ sqrt(d) w in every layer (the residual updates are small next to it);
    * keys: ``W_k += strength * w e_j^T`` per key head, so k_0 gets ~ strength * sqrt(d) along head
      coordinate j and the other tokens (no component along w) almost nothing;
    * queries: a shared bias ``query`` along e_j in every head, so every query "looks for" the sink.

    The sink logit gap is ~ query * strength * sqrt(d / d_head) (``strength = 0``: massive activation only,
    no sink). j is the lowest-frequency rotary pair (d_head/2 - 1): under Llama's rotary embedding the
    shared query direction then barely rotates over the sequence, so the sink works at every position.
    """
    w = _sink_direction(model.config.hidden_size, seed)
    _mark_sink_position(model, w, massive)
    dh = _head_dim(model)
    j = dh // 2 - 1
    d = model.config.hidden_size
    for block in find_layers(model)[1]:
        attn = _attn(block)
        if hasattr(attn, "c_attn"):  # GPT-2 Conv1D: y = x W + b, W = [W_q | W_k | W_v] of shape (d, 3d)
            q_bias, n_q = attn.c_attn.bias[:d], d // dh
            k_cols, n_k = attn.c_attn.weight[:, d:2 * d], d // dh
            for h in range(n_k):
                k_cols[:, h * dh + j] += strength * w
        else:  # nn.Linear: weight (out, in)
            if attn.q_proj.bias is None:
                raise ValueError("add_attention_sink: Llama needs query biases (build_model(attention_bias=True))")
            q_bias, n_q = attn.q_proj.bias, attn.q_proj.out_features // dh
            n_k = attn.k_proj.out_features // dh
            for h in range(n_k):
                attn.k_proj.weight[h * dh + j] += strength * w
        for h in range(n_q):
            q_bias[h * dh + j] += query


def sink_stats(captures: list[dict[int, list[dict]]]) -> dict[str, float]:
    """Attention-sink statistics of a captured trace's float64 reference, over layers, heads, batches and
    queries t >= 1 (query 0 sees only itself): mean attention mass on key 0, the least mean mass of a layer,
    and the mean logit gap s_t0 - max_{1<=s<=t} s_ts (scaled logits)."""
    mass, gap, per_layer = [], [], {}
    for caps in captures:
        for layer, recs in caps.items():
            for c in recs:
                if c["op"] != "attn":
                    continue
                p0 = c["p"][..., 1:, 0]
                s = c["s"][..., 1:, :]
                mass.append(p0.flatten())
                gap.append((s[..., 0] - s[..., 1:].amax(-1)).flatten())  # masked keys are -inf: ignored
                per_layer.setdefault(layer, []).append(p0.flatten())
    if not mass:
        raise ValueError("sink_stats: no attention captures (Tracer(..., capture=True))")
    layer_means = [float(torch.cat(v).mean()) for v in per_layer.values()]
    return {"mass": float(torch.cat(mass).mean()), "mass_min_layer": min(layer_means),
            "gap": float(torch.cat(gap).mean())}


def measure_sink(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, float]:
    """``sink_stats`` of the float64 model on ``batches`` (a float64-only trace)."""
    res = Tracer(model, Policy.fp64(), capture=True).run_batches(batches)
    return sink_stats(res.captures)


def sink_model(model: torch.nn.Module, strength: float, massive: float = 100.0, query: float = 1.0,
               seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` with ``add_attention_sink`` applied (the original stays untouched)."""
    out = copy.deepcopy(model)
    add_attention_sink(out, strength, massive=massive, query=query, seed=seed)
    return out


def calibrate_sink(model: torch.nn.Module, target_mass: float, batches: list, massive: float = 100.0,
                   query: float = 1.0, seed: int = 0, lo: float = 1e-2, hi: float = 1e2, steps: int = 12) -> float:
    """The sink ``strength`` whose measured mean sink mass (float64, on ``batches``) is ``target_mass``:
    bisection in log(strength); the mass grows monotonically with the strength (logit gap ~ linear in it).
    12 steps over [1e-2, 1e2] pin the strength to < 0.3 %; callers record the mass actually measured."""
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if measure_sink(sink_model(model, mid, massive, query, seed), batches)["mass"] < target_mass:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)

"""Round-off tracer: run a Hugging Face causal LM with a per-op precision policy against a float64 reference.

The model itself is never edited. A ``TorchFunctionMode`` intercepts the ops that carry round-off
(``F.linear``/``torch.addmm`` GEMMs, ``F.scaled_dot_product_attention``, residual additions, the gated
product of SwiGLU MLPs), module hooks round activation-function and embedding outputs, and norm modules
(LayerNorm, RMSNorm) are evaluated by an explicit, emulated formula for the duration of a trace.

Reference and test run in *lockstep*: the batch is doubled, the first half is the float64 reference (every
intercepted op evaluated natively in float64) and the second half the emulated run (each intercepted op
rounds its operands/result to the policy's formats through ``common.lowp``). Ops that are not intercepted
(reshapes, rotary embedding, masking) are elementwise in float64 and act identically on both halves, so the
emulated run differs from the reference exactly by the rounding the policy asks for. At every intercepted op
the tracer records

* the *forward* error: emulated output vs reference output (all errors accumulated so far), and
* the *local* error: emulated output vs the same op evaluated exactly on the emulated run's inputs,

per token, normwise (l2 and l-inf relative), componentwise (max_i |x^_i - x_i| / |x_i|) and the absolute l-inf
error (max_i |x^_i - x_i|), aggregated as mean / quantiles / min / max over tokens and inputs, and (kind
``"reference"``, metric ``"l2"``) each reference token's l2 norm: its minimum is the authors' ``min_token_l2``,
which says when a relative error is large because the reference token is small. With ``capture=True`` it also
keeps the reference activations (and weights) that ``exp_roundoff.bounds`` needs.

    tracer = Tracer(model, Policy.uniform("bf16", acc="fp32"))
    result = tracer.run(input_ids)           # TraceResult: .rows (list of dicts), .logits_ref, .logits_test

Public API (``__all__``; README.md in this folder, section "Tracer API"): ``Tracer``, ``TraceResult``,
``Policy``, ``OpPrecision``, ``EXACT``, ``Emulator`` (the emulated ops on their own), ``ROLES``, ``QUANTILES``,
``LINEAR_ROLES`` (module name -> op kind; extend it for another model family), ``find_layers``,
``token_errors``, ``token_norms``, ``safe_div``, ``summarize``.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from common.lowp.formats import get_format
from common.lowp.matmul import emulated_matmul
from common.lowp.quantize import quantize

__all__ = ["EXACT", "LINEAR_ROLES", "QUANTILES", "ROLES", "Emulator", "OpPrecision", "Policy", "TraceResult",
           "Tracer", "find_layers", "safe_div", "summarize", "token_errors", "token_norms"]

ROLES = ("embed", "qkv", "scores", "softmax", "value", "attn_out", "mlp_up", "act", "mlp_down", "norm",
         "residual", "lm_head")
QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)

# Linear-layer module names (last path component) -> role. GPT-2's c_proj is resolved by its parent.
LINEAR_ROLES = {
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv",
    "o_proj": "attn_out", "out_proj": "attn_out", "dense": "attn_out",
    "gate_proj": "mlp_up", "up_proj": "mlp_up", "fc1": "mlp_up", "c_fc": "mlp_up", "w1": "mlp_up", "w3": "mlp_up",
    "down_proj": "mlp_down", "fc2": "mlp_down", "w2": "mlp_down",
    "lm_head": "lm_head",
}
_ACT_NAMES = ("act", "act_fn", "activation_fn")


@dataclass(frozen=True)
class OpPrecision:
    """Formats of one op kind.

    fmt: format the op's result is stored in. in_fmt: GEMM operand format (None = fmt). acc_fmt: GEMM
    accumulator and the internal format of norms/softmax (reductions, exp, rsqrt). block_k: 0 = accumulate
    exactly (float64) and round the sum once to acc_fmt (a wide accumulator: fast); k >= 1 = round the running
    sum to acc_fmt after every k products (``common.lowp.emulated_matmul``; 1 = strict recursive summation).
    """

    fmt: str = "fp64"
    in_fmt: str | None = None
    acc_fmt: str = "fp64"
    block_k: int = 0
    mode: str = "rne"

    def __post_init__(self) -> None:
        for name in ("fmt", "in_fmt", "acc_fmt"):
            value = getattr(self, name)
            if value is not None:
                get_format(value)  # raises ValueError naming an unknown format
        if self.block_k < 0:
            raise ValueError(f"block_k must be >= 0, got {self.block_k}")

    @property
    def operand_fmt(self) -> str:
        return self.in_fmt or self.fmt

    @property
    def exact(self) -> bool:
        """All formats are float64: the op is evaluated natively (the model's own code path)."""
        return all(get_format(f).name == "fp64" for f in (self.fmt, self.operand_fmt, self.acc_fmt))

    def u(self, which: str = "fmt") -> float:
        """Unit roundoff of one of the formats (0 for float64: the reference arithmetic)."""
        fmt = get_format({"fmt": self.fmt, "in": self.operand_fmt, "acc": self.acc_fmt}[which])
        return 0.0 if fmt.name == "fp64" else fmt.unit_roundoff


EXACT = OpPrecision()


@dataclass(frozen=True)
class Policy:
    """One OpPrecision per op kind (see ROLES). ``shifted_softmax``: subtract the row max before exp."""

    embed: OpPrecision = EXACT
    qkv: OpPrecision = EXACT
    scores: OpPrecision = EXACT
    softmax: OpPrecision = EXACT
    value: OpPrecision = EXACT
    attn_out: OpPrecision = EXACT
    mlp_up: OpPrecision = EXACT
    act: OpPrecision = EXACT
    mlp_down: OpPrecision = EXACT
    norm: OpPrecision = EXACT
    residual: OpPrecision = EXACT
    lm_head: OpPrecision = EXACT
    shifted_softmax: bool = True

    @classmethod
    def fp64(cls) -> Policy:
        return cls()

    @classmethod
    def uniform(cls, fmt: str, acc: str = "fp32", block_k: int = 0, in_fmt: str | None = None,
                internal: str | None = None) -> Policy:
        """Every op stores ``fmt``; GEMMs accumulate in ``acc``; norms/softmax compute internally in
        ``internal`` (default ``acc``), as CPU/GPU kernels for bf16/fp16 do in fp32."""
        gemm = OpPrecision(fmt=fmt, in_fmt=in_fmt, acc_fmt=acc, block_k=block_k)
        inner = OpPrecision(fmt=fmt, acc_fmt=internal or acc)
        elem = OpPrecision(fmt=fmt)
        return cls(embed=elem, qkv=gemm, scores=gemm, softmax=inner, value=gemm, attn_out=gemm, mlp_up=gemm,
                   act=elem, mlp_down=gemm, norm=inner, residual=elem, lm_head=gemm)

    def with_ops(self, ops: dict[str, OpPrecision] | None = None, **kw: OpPrecision) -> Policy:
        changes = {**(ops or {}), **kw}
        unknown = set(changes) - set(ROLES) - {"shifted_softmax"}
        if unknown:
            raise ValueError(f"unknown op kinds {sorted(unknown)}; known: {ROLES}")
        return replace(self, **changes)

    def op(self, role: str) -> OpPrecision:
        return getattr(self, role)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: (v.__dict__ if isinstance(v, OpPrecision) else v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- metrics
def token_errors(ref: torch.Tensor, test: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row (last dim = one token's vector) relative errors and the absolute l-inf error ``abs_linf`` (the
    authors' metric, max_i |x^_i - x_i|); non-finite reference entries are ignored (masked attention scores); a
    zero reference row has relative error 0 if reproduced exactly, else inf."""
    ref = ref.reshape(-1, ref.shape[-1]).double()
    test = test.reshape(-1, test.shape[-1]).double()
    ok = torch.isfinite(ref)
    diff = torch.where(ok, test - ref, 0.0).abs()
    diff = torch.where(torch.isnan(diff), math.inf, diff)  # a NaN in the test run is an infinite error
    r = torch.where(ok, ref, 0.0).abs()
    l2 = safe_div(diff.norm(dim=1), r.norm(dim=1))
    linf = safe_div(diff.amax(dim=1), r.amax(dim=1))
    # componentwise: 0 where the reference component is 0 (the authors' convention; ReLU zeros would be inf)
    comp = torch.where(r > 0, diff / r.clamp_min(torch.finfo(torch.float64).tiny), 0.0).amax(dim=1)
    return {"rel_l2": l2, "rel_linf": linf, "rel_comp": comp, "abs_linf": diff.amax(dim=1)}


def token_norms(ref: torch.Tensor) -> torch.Tensor:
    """Per-row l2 norm of the reference (non-finite entries ignored, as in ``token_errors``): the denominator
    of ``rel_l2``; its minimum over tokens is the authors' ``min_token_l2``."""
    ref = ref.reshape(-1, ref.shape[-1]).double()
    return torch.where(torch.isfinite(ref), ref, 0.0).norm(dim=1)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0/0 = 0 (an exact zero) and x/0 = inf; keeps every token, so token orders align."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.where(num > 0, math.inf, 0.0))


def summarize(values: torch.Tensor, quantiles: tuple[float, ...] = QUANTILES) -> dict[str, float]:
    v = values.double().flatten()
    if v.numel() == 0:
        return {}
    finite = v[torch.isfinite(v)]
    out = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": int(v.numel())}
    qs = torch.quantile(finite, torch.tensor(quantiles, dtype=torch.float64)) if finite.numel() else None
    for q, val in zip(quantiles, qs if qs is not None else [math.nan] * len(quantiles)):
        out[f"p{round(q * 100):02d}"] = float(val)
    return out


@dataclass
class TraceResult:
    """Per-(layer, op) error statistics (``rows``), activation statistics and reference/emulated logits."""

    rows: list[dict]
    activation_stats: list[dict]
    logits_ref: torch.Tensor    # (tokens, vocab), batches concatenated
    logits_test: torch.Tensor
    captures: list[dict[int, list[dict]]] = field(default_factory=list)  # per batch: layer -> op records
    token_values: dict[tuple[int, str, str, str], torch.Tensor] = field(default_factory=dict)

    def get(self, layer: int, op: str, kind: str = "forward", metric: str = "rel_l2") -> dict:
        for r in self.rows:
            if (r["layer"], r["op"], r["kind"], r["metric"]) == (layer, op, kind, metric):
                return r
        raise KeyError(f"no row for layer={layer} op={op} kind={kind} metric={metric}")

    def block_errors(self, metric: str = "rel_l2", stat: str = "mean") -> list[float]:
        rows = sorted((r for r in self.rows if r["op"] == "block_out" and r["metric"] == metric),
                      key=lambda r: r["layer"])
        return [r[stat] for r in rows]


# ------------------------------------------------------------------------------------- model structure
def find_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(dotted name, module list) of the decoder layers: the shortest-named non-empty ModuleList called
    ``layers`` / ``h`` / ``blocks`` (Llama/OPT, GPT-2, ...); ValueError when there is none."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if best is None or len(name) < len(best[0]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder-layer list (layers / h / blocks)")
    return best


def _norm_kind(mod: torch.nn.Module) -> str | None:
    cls = type(mod).__name__
    if isinstance(mod, torch.nn.LayerNorm) or cls.endswith("LayerNorm"):
        return "layernorm"
    if cls.endswith("RMSNorm") and hasattr(mod, "weight"):
        return "rmsnorm"
    return None


@dataclass
class _ModInfo:
    name: str
    layer: int          # decoder-layer index, n_layers for modules after the last layer, -1 before
    role: str | None    # op role of a linear / norm / activation module
    kind: str           # "linear", "norm", "act", "embed", "layer", "mlp", "base", "other"


def _describe(model: torch.nn.Module) -> tuple[dict[int, _ModInfo], int]:
    layers_name, layers = find_layers(model)
    base_name = layers_name.rsplit(".", 1)[0] if "." in layers_name else ""
    depth = len(layers_name.split(".")) + 1
    n_layers = len(layers)
    info: dict[int, _ModInfo] = {}
    for name, mod in model.named_modules():
        parts = name.split(".")
        last = parts[-1]
        cls = type(mod).__name__
        if name.startswith(layers_name + "."):
            layer = int(parts[depth - 1])
        else:  # before the first layer: embeddings; after the last: final norm and LM head
            layer = -1 if isinstance(mod, torch.nn.Embedding) or name == base_name else n_layers
        kind, role = "other", None
        if name.startswith(layers_name + ".") and len(parts) == depth:
            kind = "layer"
        elif name == base_name:
            kind = "base"
        elif isinstance(mod, torch.nn.Embedding):
            kind, role = "embed", "embed"
        elif _norm_kind(mod):
            kind, role = "norm", "norm"
        elif isinstance(mod, torch.nn.Linear) or cls == "Conv1D":
            kind = "linear"
            role = LINEAR_ROLES.get(last)
            if last == "c_proj":
                role = "attn_out" if "attn" in parts[-2] else "mlp_down"
            if role is None:
                raise ValueError(f"linear module '{name}' ({cls}): unknown role; extend LINEAR_ROLES")
        elif last in _ACT_NAMES and not list(mod.parameters()):
            kind, role = "act", "act"
        elif last in ("mlp", "feed_forward"):
            kind = "mlp"
        info[id(mod)] = _ModInfo(name, layer, role, kind)
    return info, n_layers


# -------------------------------------------------------------------------------------- emulated ops
class Emulator:
    """The emulated ops: what the tracer runs on the test half, usable on their own (float64 tensors in, float64
    tensors holding values of the policy's formats out). Weights are rounded once per Emulator (per trace)."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self._wcache: dict[tuple[int, str], torch.Tensor] = {}

    def q(self, x: torch.Tensor, fmt: str, mode: str = "rne") -> torch.Tensor:
        if get_format(fmt).name == "fp64":
            return x
        return quantize(x, fmt, mode=mode)

    def weight(self, w: torch.Tensor, fmt: str) -> torch.Tensor:
        # keyed by storage, shape and strides: views such as w.t() are new objects on every call
        key = (w.data_ptr(), tuple(w.shape), w.stride(), fmt)
        if key not in self._wcache:
            self._wcache[key] = self.q(w.detach(), fmt)
        return self._wcache[key]

    def gemm(self, a: torch.Tensor, b: torch.Tensor, p: OpPrecision, b_is_weight: bool = False,
             out_fmt: str | None = None) -> torch.Tensor:
        """a @ b (a: (..., K), b: (K, N) or batched (..., K, N)) with p's operand/accumulator formats; the
        result is rounded to acc_fmt (and then to ``out_fmt``, default p.fmt)."""
        aq = self.q(a, p.operand_fmt)
        bq = self.weight(b, p.operand_fmt) if b_is_weight else self.q(b, p.operand_fmt)
        if p.block_k == 0 or get_format(p.acc_fmt).name == "fp64":
            y = self.q(aq @ bq, p.acc_fmt, p.mode)
        else:
            if b.dim() == 2:
                y = emulated_matmul(aq.reshape(-1, aq.shape[-1]), bq, p.operand_fmt, p.acc_fmt, p.acc_fmt,
                                    p.block_k, p.mode).double().reshape(*aq.shape[:-1], bq.shape[-1])
            else:
                lead = aq.shape[:-2]
                y = emulated_matmul(aq.reshape(-1, *aq.shape[-2:]), bq.reshape(-1, *bq.shape[-2:]),
                                    p.operand_fmt, p.acc_fmt, p.acc_fmt, p.block_k, p.mode)
                y = y.double().reshape(*lead, aq.shape[-2], bq.shape[-1])
        return self.q(y, out_fmt or p.fmt)

    def linear(self, x: torch.Tensor, w_kn: torch.Tensor, bias: torch.Tensor | None, p: OpPrecision) -> torch.Tensor:
        y = self.gemm(x, w_kn, p, b_is_weight=True, out_fmt=p.acc_fmt)
        if bias is not None:  # added to the accumulator before the output rounding (GEMM epilogue)
            y = self.q(y + self.weight(bias, p.operand_fmt), p.acc_fmt)
        return self.q(y, p.fmt)

    def reduce_sum(self, x: torch.Tensor, p: OpPrecision) -> torch.Tensor:
        """Sum over the last dim in p.acc_fmt (block_k as for GEMMs: a dot product with ones)."""
        if p.block_k == 0 or get_format(p.acc_fmt).name == "fp64":
            return self.q(x.sum(-1, keepdim=True), p.acc_fmt)
        ones = torch.ones(x.shape[-1], 1, dtype=x.dtype, device=x.device)
        flat = emulated_matmul(x.reshape(-1, x.shape[-1]), ones, p.acc_fmt, p.acc_fmt, p.acc_fmt, p.block_k,
                               p.mode)
        return flat.double().reshape(*x.shape[:-1], 1)

    def norm(self, x: torch.Tensor, kind: str, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float, p: OpPrecision) -> torch.Tensor:
        """LayerNorm / RMSNorm with every internal step (incl. the mean and variance reductions) rounded to
        p.acc_fmt and the result to p.fmt."""
        a = p.acc_fmt
        d = x.shape[-1]
        if kind == "layernorm":
            mu = self.q(self.reduce_sum(x, p) / d, a)
            c = self.q(x - mu, a)
        else:
            c = x
        var = self.q(self.reduce_sum(self.q(c * c, a), p) / d, a)
        rstd = self.q(torch.rsqrt(self.q(var + eps, a)), a)
        y = self.q(c * rstd, a)
        if kind == "rmsnorm":  # the Llama order: normalise, store, then scale by the stored weight
            y = self.q(y, p.fmt)
            return self.q(y * self.weight(weight, p.fmt), p.fmt) if weight is not None else y
        if weight is not None:
            y = self.q(y * self.weight(weight, p.fmt), a)
        if bias is not None:
            y = self.q(y + self.weight(bias, p.fmt), a)
        return self.q(y, p.fmt)

    def softmax(self, s: torch.Tensor, p: OpPrecision, shifted: bool) -> torch.Tensor:
        a = p.acc_fmt
        if shifted:
            m = s.amax(-1, keepdim=True)
            z = self.q(s - torch.where(torch.isfinite(m), m, 0.0), a)
        else:
            z = s
        e = self.q(torch.exp(z), a)
        total = self.reduce_sum(e, p)
        # a fully masked row (a left-padding query) has no probabilities: 0, as torch's SDPA returns
        return self.q(self.q(torch.where(total > 0, e / total, 0.0), a), p.fmt)


def _ref_norm(x: torch.Tensor, kind: str, weight, bias, eps: float, normalized_shape) -> torch.Tensor:
    if kind == "layernorm":
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h if weight is not None else h


# --------------------------------------------------------------------------------------------- tracer
class _Mode(TorchFunctionMode):
    def __init__(self, tracer: Tracer):
        super().__init__()
        self.t = tracer

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = self.t
        top = t.stack[-1] if t.stack else None
        if top is not None:
            if func is F.linear and top.kind == "linear":
                x, w = args[0], args[1]
                b = args[2] if len(args) > 2 else kwargs.get("bias")
                return t.op_linear(top, x, w.t(), b, lambda xx: func(xx, w, b))
            if func is torch.addmm and top.kind == "linear":  # transformers Conv1D: addmm(bias, x, W)
                b, x, w = args[0], args[1], args[2]
                return t.op_linear(top, x, w, b, lambda xx: func(b, xx, w))
            if func is F.scaled_dot_product_attention:
                return t.op_sdpa(top, func, args, kwargs)
            stream = t.is_stream_op(args)
            if stream and func in (torch.Tensor.add, torch.add, torch.Tensor.__add__, torch.Tensor.__radd__):
                if top.kind == "layer":
                    return t.op_elementwise(top, "residual", func, args, kwargs)
                if top.kind == "base":
                    return t.op_elementwise(top, "embed", func, args, kwargs)
            if stream and func in (torch.Tensor.mul, torch.mul, torch.Tensor.__mul__) and top.kind == "mlp":
                return t.op_elementwise(top, "act", func, args, kwargs)
        return func(*args, **kwargs)


class Tracer:
    """Runs ``model`` (float64 weights) under ``policy`` against its float64 reference; see module doc."""

    def __init__(self, model: torch.nn.Module, policy: Policy, capture: bool = False,
                 keep_token_values: bool = False, quantiles: tuple[float, ...] = QUANTILES):
        if next(model.parameters()).dtype != torch.float64:
            raise ValueError("Tracer needs a float64 model (model.double()): the reference runs in float64")
        self.model = model
        self.policy = policy
        self.capture = capture
        self.keep_token_values = keep_token_values
        self.quantiles = quantiles
        self.info, self.n_layers = _describe(model)
        self.stack: list[_ModInfo] = []

    # ---- bookkeeping
    def is_stream_op(self, args) -> bool:
        """A binary op on two float64 activation tensors of the doubled batch (not masks / positions)."""
        if len(args) < 2 or not (torch.is_tensor(args[0]) and torch.is_tensor(args[1])):
            return False
        a, b = args[0], args[1]
        return (a.dtype == b.dtype == torch.float64 and a.dim() >= 2 and b.dim() >= 2
                and a.shape[0] % 2 == 0 and a.shape[0] >= 2)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] == 1 and self._batch > 1:  # broadcast over the batch (e.g. position embeddings)
            x = x.expand(2 * self._batch, *x.shape[1:])
        elif x.shape[0] == 1:
            x = x.expand(2, *x.shape[1:])
        n = x.shape[0] // 2
        if x.shape[0] != 2 * n or n == 0:
            raise RuntimeError(f"tracer: expected a doubled leading dim, got shape {tuple(x.shape)}")
        return x[:n], x[n:]

    def _record(self, layer: int, op: str, ref: torch.Tensor, test: torch.Tensor,
                exact_on_test: torch.Tensor | None = None) -> None:
        for kind, base in (("forward", ref), ("local", exact_on_test)):
            if base is None:
                continue
            for metric, vals in token_errors(base.detach(), test.detach()).items():
                self._errs[(layer, op, kind, metric)].append(vals.cpu())
        # the reference's own token norms (not an error): min_token_l2 explains large relative errors
        self._errs[(layer, op, "reference", "l2")].append(token_norms(ref.detach()).cpu())

    def _stat(self, layer: int, name: str, vals: torch.Tensor) -> None:
        self._stats[(layer, name)].append(vals.detach().double().flatten().cpu())

    def _cap(self, layer: int, **tensors: Any) -> None:
        if self.capture:
            self._captures[layer].append({k: (v.detach().clone() if torch.is_tensor(v) else v)
                                          for k, v in tensors.items()})

    # ---- intercepted ops
    def op_linear(self, mod: _ModInfo, x: torch.Tensor, w_kn: torch.Tensor, bias, native) -> torch.Tensor:
        p = self.policy.op(mod.role)
        xr, xt = self._split(x)
        yr = native(xr)
        exact_t = native(xt)
        yt = exact_t if p.exact else self.emu.linear(xt, w_kn, bias, p)
        self._record(mod.layer, mod.role, yr, yt, exact_t)
        self._cap(mod.layer, op=mod.role, name=mod.name.split(".")[-1], x=xr, y=yr, w_kn=w_kn.detach(),
                  bias=None if bias is None else bias.detach())
        return torch.cat([yr, yt])

    def op_elementwise(self, mod: _ModInfo, role: str, func, args, kwargs) -> torch.Tensor:
        out = func(*args, **kwargs)
        p = self.policy.op(role)
        yr, yt = self._split(out)
        if not p.exact:
            yt = self.emu.q(yt, p.fmt)
        name = "residual" if role == "residual" else ("gate_mul" if role == "act" else "embed_add")
        self._record(mod.layer, name, yr, yt, self._split(out)[1])
        if role == "residual":
            a = args[0] if torch.is_tensor(args[0]) else args[1]
            self._cap(mod.layer, op="residual", y=yr, x=self._split(a)[0])
        elif role == "act":
            self._cap(mod.layer, op="gate_mul", a=self._split(args[0])[0], b=self._split(args[1])[0], y=yr)
        else:
            self._cap(mod.layer, op="embed_add", y=yr)
        return torch.cat([yr, yt])

    def op_sdpa(self, mod: _ModInfo, func, args, kwargs) -> torch.Tensor:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, args))
        a.update(kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        mask, is_causal, scale = a.get("attn_mask"), a.get("is_causal", False), a.get("scale")
        if a.get("dropout_p", 0.0):
            raise RuntimeError("tracer: attention dropout must be off (model.eval())")
        qr, qt = self._split(q)
        kr, kt = self._split(k)
        vr, vt = self._split(v)
        if mask is not None and mask.shape[0] == q.shape[0]:
            mr, mt = self._split(mask)
        else:
            mr = mt = mask
        extra = {kk: a[kk] for kk in ("is_causal", "scale", "enable_gqa") if kk in a}
        out_r = func(qr, kr, vr, attn_mask=mr, **extra)
        exact_t = func(qt, kt, vt, attn_mask=mt, **extra)
        if a.get("enable_gqa") and k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            kr, kt, vr, vt = (z.repeat_interleave(rep, dim=1) for z in (kr, kt, vr, vt))
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        L, S = q.shape[-2], k.shape[-2]
        if is_causal:
            mask_r = mask_t = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L)
        else:
            mask_r, mask_t = mr, mt

        def masked(s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
            if m is None:
                return s
            return s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m

        # reference, decomposed in float64 for the per-op records (out_r itself is the native kernel's)
        s_ref = masked((qr @ kr.transpose(-1, -2)) * scale, mask_r)
        p_ref = torch.softmax(s_ref, dim=-1)
        pol = self.policy
        if pol.scores.exact and pol.softmax.exact and pol.value.exact:
            out_t = exact_t
            s_t, p_t = masked((qt @ kt.transpose(-1, -2)) * scale, mask_t), None
        else:
            e = self.emu
            s_t = e.gemm(qt, kt.transpose(-1, -2), pol.scores)
            s_t = masked(e.q(s_t * scale, pol.scores.fmt), mask_t)
            p_t = e.softmax(s_t, pol.softmax, pol.shifted_softmax) if not pol.softmax.exact \
                else torch.softmax(s_t, dim=-1)
            out_t = e.gemm(p_t, vt, pol.value)
        layer = mod.layer
        self._record(layer, "scores", s_ref, s_t)
        if p_t is not None:
            self._record(layer, "softmax", p_ref, p_t)

        def to_tok(z: torch.Tensor) -> torch.Tensor:  # (B, H, T, dh) -> (B, T, H*dh)
            return z.transpose(1, 2).reshape(z.shape[0], z.shape[2], -1)
        self._record(layer, "value", to_tok(out_r), to_tok(out_t), to_tok(exact_t))
        # activation statistics the bounds and the attention-sink experiments use
        finite = torch.isfinite(s_ref)
        self._stat(layer, "max_abs_score", torch.where(finite, s_ref, 0.0).abs().amax(-1))
        self._stat(layer, "softmax_sensitivity", (2 * p_ref * (1 - p_ref) * torch.where(finite, s_ref, 0.0).abs())
                   .amax(-1))
        self._stat(layer, "max_prob", p_ref.amax(-1))
        self._cap(layer, op="attn", q=qr, k=kr, v=vr, p=p_ref, s=s_ref, o=out_r, scale=scale)
        return torch.cat([out_r, out_t])

    def norm_forward(self, module: torch.nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
        with torch._C.DisableTorchFunction():  # emulation code must not re-enter the tracer's mode
            return self._norm_forward(module, kind, x)

    def _norm_forward(self, module: torch.nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
        info = self.info[id(module)]
        eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5)))
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        shape = getattr(module, "normalized_shape", (x.shape[-1],))
        xr, xt = self._split(x)
        yr = _ref_norm(xr, kind, weight, bias, eps, shape)
        exact_t = _ref_norm(xt, kind, weight, bias, eps, shape)
        p = self.policy.norm
        yt = exact_t if p.exact else self.emu.norm(xt, kind, weight, bias, eps, p)
        self._record(info.layer, "norm", yr, yt, exact_t)
        c = xr - xr.mean(-1, keepdim=True)
        d = xr.shape[-1]
        # LayerNorm conditioning ||x||_inf * sqrt(d) / ||x - mean||_2 (large for mean-dominated inputs)
        self._stat(info.layer, f"{kind}_cond", xr.abs().amax(-1) * math.sqrt(d) / c.norm(dim=-1).clamp_min(1e-300))
        self._stat(info.layer, "norm_input_linf", xr.abs().amax(-1))
        self._cap(info.layer, op="norm", kind=kind, x=xr, y=yr, weight=None if weight is None else weight.detach(),
                  bias=None if bias is None else bias.detach(), eps=eps)
        return torch.cat([yr, yt])

    # ---- hooks
    def _pre(self, module, args):
        self.stack.append(self.info[id(module)])

    def _post(self, module, args, output):
        info = self.stack.pop()
        with torch._C.DisableTorchFunction():
            return self._post_impl(info, module, args, output)

    def _post_impl(self, info: _ModInfo, module, args, output):
        if info.kind in ("act", "embed") and torch.is_tensor(output):
            p = self.policy.op(info.role)
            yr, yt = self._split(output)
            yt_q = yt if p.exact else self.emu.q(yt, p.fmt)
            self._record(info.layer, info.role, yr, yt_q, yt)
            if info.kind == "act":
                self._cap(info.layer, op="act", x=self._split(args[0])[0], y=yr, fn=module)
            else:
                self._cap(info.layer, op="embed", y=yr)
            return torch.cat([yr, yt_q])
        if info.kind == "layer":
            hidden = output[0] if isinstance(output, tuple) else output
            yr, yt = self._split(hidden)
            self._record(info.layer, "block_out", yr, yt)
            self._stat(info.layer, "residual_l2", yr.norm(dim=-1))
        return None

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TraceResult:
        """Trace one batch (B, T) of token ids; returns errors aggregated over its tokens."""
        return self.run_batches([(input_ids, attention_mask)])

    @torch.no_grad()
    def run_batches(self, batches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> TraceResult:
        model = self.model
        if model.training:
            raise RuntimeError("tracer: call model.eval() first (dropout would differ between the halves)")
        self._errs: dict = defaultdict(list)
        self._stats: dict = defaultdict(list)
        captures: list[dict] = []
        self.emu = Emulator(self.policy)
        handles, saved_forwards = [], {}
        old_impl = model.config._attn_implementation
        model.config._attn_implementation = "sdpa"
        for mod in model.modules():
            handles.append(mod.register_forward_pre_hook(self._pre))
            handles.append(mod.register_forward_hook(self._post))
            kind = _norm_kind(mod)
            if kind:
                saved_forwards[mod] = mod.__dict__.get("forward")
                mod.forward = types.MethodType(lambda m, x, _k=kind: self.norm_forward(m, _k, x), mod)
        logits_ref, logits_test = [], []
        try:
            for ids, mask in batches:
                ids2 = torch.cat([ids, ids])
                mask2 = None if mask is None else torch.cat([mask, mask])
                self._batch = ids.shape[0]
                self.stack.clear()
                self._captures = defaultdict(list)
                with _Mode(self):
                    out = model(input_ids=ids2, attention_mask=mask2, use_cache=False)
                lr, lt = self._split(out.logits)
                self._record(self.n_layers, "logits", lr, lt)
                if self.capture:
                    captures.append(dict(self._captures))
                logits_ref.append(lr.reshape(-1, lr.shape[-1]))
                logits_test.append(lt.reshape(-1, lt.shape[-1]))
        finally:
            for h in handles:
                h.remove()
            for mod, fwd in saved_forwards.items():
                if fwd is None:
                    del mod.forward
                else:
                    mod.forward = fwd
            model.config._attn_implementation = old_impl
            self.stack.clear()
        rows = []
        token_values = {}
        for (layer, op, kind, metric), chunks in sorted(self._errs.items(), key=lambda kv: str(kv[0])):
            vals = torch.cat(chunks)
            if self.keep_token_values:
                token_values[(layer, op, kind, metric)] = vals
            rows.append({"layer": layer, "op": op, "kind": kind, "metric": metric,
                         **summarize(vals, self.quantiles)})
        stats = [{"layer": layer, "stat": name, **summarize(torch.cat(chunks), self.quantiles)}
                 for (layer, name), chunks in sorted(self._stats.items(), key=lambda kv: str(kv[0]))]
        return TraceResult(rows, stats, torch.cat(logits_ref), torch.cat(logits_test), captures,
                           token_values)


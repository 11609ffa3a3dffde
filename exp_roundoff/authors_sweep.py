"""The authors' mantissa-width sweep (Budzinskiy et al., github sbudzinskiy/lowprec-llm-inference), reconstructed.

One GEMM kind of a decoder block (``TARGETS``: 9 per architecture) has its fp32 accumulator rounded to ``p``
mantissa bits in every block; everything else runs in plain float32. The errors of the residual stream before
the second norm (``pre_ln2``: input of ``post_attention_layernorm`` / ``ln_2``) and of the block output
(``block_out``) against a reference are recorded per token and reported as quantiles over tokens.

Semantics (README, section "Authors' sweep"; each reconstructed detail is a key of ``AuthorsSweepConfig``):

* rounding (``round_mantissa``): round-to-nearest-even of float32 values to ``p`` fraction bits, fp32's exponent
  range (subnormals keep their fixed quantum 2^(-126-p), overflow carries into inf, NaN/inf pass through) —
  identical to ``common.lowp.quantize(x, (8, p))``, implemented on the bit pattern for speed in the K loop;
* GEMM (``authors_gemm``): ``strict``: ``acc = round_p(acc + a_k b_k)`` after every product (fp32 products);
  ``efficient``: ``acc = round_p(acc + A_blk B_blk)`` after every ``block_k`` products, the block product in fp32
  with TF32 operands (Triton's ``tl.dot`` on fp32 inputs uses TF32 by default; its conversion truncates, hence
  ``tf32_rounding = "rz"``); the bias is added afterwards in fp32 (the kernel has none);
* references: ``fp64`` (the same weights in float64, the authors' reference) and ``fp32`` (the float32 model with
  the target on the same accumulation schedule at p = 23: isolates the rounding; its error at p = 23 is 0);
* residual scaling: ``forward`` (the block computes x + s·attn(ln1(x)) and x + s·mlp(ln2(x)), a forward
  multiplier as in the authors' code) or ``weights`` (``models.scale_residual_projections``), with the authors'
  weight-reset flags (``reset_weights``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from common.lowp.tracer import find_layers, token_errors

FP32_MAN = 23
_ATTN_NAME = "llm4all_authors_sweep"   # the attention implementation registered with transformers

# Per architecture: target -> (module path inside a decoder block, slice index of GPT-2's fused c_attn or None).
# "scores" (q k^T) and "value" (P v) are the attention GEMMs (module path None: computed in _attention).
TARGETS: dict[str, dict[str, tuple[str | None, int | None]]] = {
    "llama": {"q": ("self_attn.q_proj", None), "k": ("self_attn.k_proj", None), "v": ("self_attn.v_proj", None),
              "scores": (None, None), "value": (None, None), "o": ("self_attn.o_proj", None),
              "gate": ("mlp.gate_proj", None), "up": ("mlp.up_proj", None), "down": ("mlp.down_proj", None)},
    # GPT-2 has 8 GEMMs in a block; the 9th target is the authors' own "attention QKV" knob (all of c_attn)
    "gpt2": {"qkv": ("attn.c_attn", None), "q": ("attn.c_attn", 0), "k": ("attn.c_attn", 1), "v": ("attn.c_attn", 2),
             "scores": (None, None), "value": (None, None), "o": ("attn.c_proj", None),
             "fc": ("mlp.c_fc", None), "proj": ("mlp.c_proj", None)},
}
# Position of each GEMM in a block's data flow (equal = parallel): a GEMM at a stage <= the target's does
# not depend on the target's output in the same block (tests use it).
GEMM_STAGE = {"q": 0, "k": 0, "v": 0, "qkv": 0, "scores": 1, "value": 2, "o": 3, "gate": 4, "up": 4, "fc": 4,
              "down": 5, "proj": 5}
PRE_LN2 = {"llama": "post_attention_layernorm", "gpt2": "ln_2"}
ATTN = {"llama": "self_attn", "gpt2": "attn"}
POINTS = ("pre_ln2", "block_out")
METRICS = ("rel_comp", "rel_linf")
RESID_PROJ = ("o_proj", "down_proj", "c_proj")


# ------------------------------------------------------------------------------------------ rounding
def round_bits(x: torch.Tensor, p: int, mode: str = "rne") -> torch.Tensor:
    """Round float32 ``x`` to ``p`` fraction bits (fp32 exponent range): ``"rne"`` nearest-even, ``"rz"``
    truncation. NaN and inf pass through; a finite value rounding past the largest one becomes inf (RNE)."""
    if x.dtype != torch.float32:
        raise TypeError(f"round_bits needs float32, got {x.dtype}")
    if not 1 <= p <= FP32_MAN:  # p = 0 (1-bit significands) leaves "ties to even" undefined
        raise ValueError(f"p must be in 1..{FP32_MAN}, got {p}")
    r = FP32_MAN - p
    if r == 0:
        return x
    bits = x.view(torch.int32)
    mag = bits & 0x7FFFFFFF
    if mode == "rne":
        # add half an ulp minus one, plus the kept LSB (ties to even); the carry moves into the exponent
        mag = mag + ((1 << (r - 1)) - 1) + ((mag >> r) & 1)
    elif mode != "rz":
        raise ValueError(f"mode must be 'rne' or 'rz', got {mode!r}")
    out = ((bits & -(1 << 31)) | (mag & -(1 << r))).view(torch.float32)
    return torch.where((bits & 0x7F800000) == 0x7F800000, x, out)


def round_mantissa(x: torch.Tensor, p: int) -> torch.Tensor:
    """The authors' rounding: RNE of float32 values to ``p`` mantissa bits, exponent range of fp32."""
    return round_bits(x, p, "rne")


# ---------------------------------------------------------------------------------------------- GEMM
@dataclass(frozen=True)
class GemmSpec:
    """How the target GEMM is evaluated: mantissa bits of the accumulator and the accumulation schedule."""

    p: int
    mode: str = "efficient"        # "strict" (round after every product) | "efficient" (after every block)
    block_k: int = 32
    tf32: bool = True              # efficient mode: operands TF32 (tl.dot on fp32 inputs)
    tf32_rounding: str = "rz"
    fma: bool = False              # strict mode: acc + a*b fused (one rounding to fp32) instead of two

    def __post_init__(self) -> None:
        if self.mode not in ("strict", "efficient"):
            raise ValueError(f"mode must be 'strict' or 'efficient', got {self.mode!r}")
        if not 1 <= self.p <= FP32_MAN:
            raise ValueError(f"p must be in 1..{FP32_MAN}, got {self.p}")
        if self.block_k < 1:
            raise ValueError(f"block_k must be >= 1, got {self.block_k}")


def authors_gemm(a: torch.Tensor, b: torch.Tensor, spec: GemmSpec) -> torch.Tensor:
    """``a @ b`` (a: (..., M, K), b: (K, N) or (..., K, N), float32) with the running sum rounded to
    ``spec.p`` mantissa bits after every product (strict) or every ``block_k`` products (efficient)."""
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise TypeError(f"authors_gemm needs float32 operands, got {a.dtype} and {b.dtype}")
    k_dim = a.shape[-1]
    acc = torch.zeros(torch.broadcast_shapes(a.shape[:-1] + (1,), b.shape[:-2] + (1, b.shape[-1])),
                      dtype=torch.float32, device=a.device)
    if spec.mode == "efficient":
        if spec.tf32:
            a, b = round_bits(a, 10, spec.tf32_rounding), round_bits(b, 10, spec.tf32_rounding)
        for k0 in range(0, k_dim, spec.block_k):
            acc = round_mantissa(acc + a[..., k0:k0 + spec.block_k] @ b[..., k0:k0 + spec.block_k, :], spec.p)
        return acc
    for k in range(k_dim):
        ak, bk = a[..., k:k + 1], b[..., k:k + 1, :]
        if spec.fma:  # the fp64 sum of an exact fp32 product: one rounding to fp32 except in rare double-rounding cases
            acc = (acc.double() + ak.double() * bk.double()).float()
        else:
            acc = acc + ak * bk
        acc = round_mantissa(acc, spec.p)
    return acc


# ------------------------------------------------------------------------------------ instrumentation
@dataclass
class _State:
    layer: int
    target: str | None
    spec: GemmSpec | None
    record: dict | None


def _gemm(st: _State | None, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if st is not None and st.target == name and a.dtype == torch.float32:
        y = authors_gemm(a, b, st.spec)
    else:
        y = torch.matmul(a, b)
    if st is not None and st.record is not None:
        st.record[(st.layer, name)] = y.detach().clone()
    return y


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF eager attention (scores GEMM, scale, additive mask, softmax in the working dtype, value GEMM) with
    the two GEMMs routed through ``_gemm``."""
    st = getattr(module, "_authors_state", None)
    rep = query.shape[1] // key.shape[1]
    if rep > 1:  # GQA: transformers' repeat_kv
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    s = _gemm(st, "scores", query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        s = s + attention_mask
    probs = torch.softmax(s, dim=-1)
    out = _gemm(st, "value", probs, value)
    return out.transpose(1, 2).contiguous(), probs


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_ATTN_NAME, _attention)
    AttentionMaskInterface.register(_ATTN_NAME, eager_mask)


def arch_of(model: torch.nn.Module) -> str:
    """"llama" (Llama, SmolLM2) or "gpt2", from the model's config."""
    kind = model.config.model_type
    if kind not in TARGETS:
        raise ValueError(f"authors_sweep: model type '{kind}' not supported (supported: {sorted(TARGETS)})")
    return kind


def _rms_forward(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # LlamaRMSNorm casts to float32 inside: the float64 reference would not be float64. Same formula, own dtype.
    return mod.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon))


def _emulated_forward(mod: torch.nn.Module, x: torch.Tensor, st: _State, part: int | None) -> torch.Tensor:
    """The forward of a Linear / Conv1D target: its GEMM (or a q/k/v column slice of it) by authors_gemm."""
    w = mod.weight
    x2 = x.reshape(-1, x.shape[-1])
    conv1d = type(mod).__name__ == "Conv1D"     # GPT-2: y = x W + b with W of shape (in, out)
    wk = w if conv1d else w.t()
    if part is None:
        y = authors_gemm(x2, wk.contiguous(), st.spec)
        if mod.bias is not None:
            y = y + mod.bias
    else:  # one of q / k / v: a column slice of the fused c_attn GEMM
        y = torch.addmm(mod.bias, x2, w)
        d = w.shape[1] // 3
        cols = slice(part * d, (part + 1) * d)
        y[:, cols] = authors_gemm(x2, wk[:, cols].contiguous(), st.spec) + mod.bias[cols]
    return y.reshape(*x.shape[:-1], y.shape[-1])


@contextlib.contextmanager
def instrument(model: torch.nn.Module, target: str | None = None, spec: GemmSpec | None = None,
               resid_scale: float = 1.0, record: dict | None = None) -> Iterator[dict]:
    """Run ``model`` with ``target`` (a key of ``TARGETS[arch]``, None = none) evaluated by ``authors_gemm``
    in every block, the residual branches multiplied by ``resid_scale``; yields a dict that the forward fills
    with ``(layer, point) -> tensor`` for ``POINTS``. ``record``: also ``(layer, gemm) -> output`` of every GEMM."""
    arch = arch_of(model)
    table = TARGETS[arch]
    if target is not None and target not in table:
        raise ValueError(f"unknown target '{target}' for {arch}; known: {list(table)}")
    if target is not None and spec is None:
        raise ValueError("instrument: a target needs a GemmSpec")
    _register_attention()
    captured: dict = {}
    handles, saved = [], []
    old_impl = model.config._attn_implementation

    def patch(mod: torch.nn.Module, fn) -> None:
        saved.append((mod, mod.__dict__.get("forward")))
        mod.forward = types.MethodType(fn, mod)

    try:
        model.config._attn_implementation = _ATTN_NAME
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                patch(mod, _rms_forward)
        for i, block in enumerate(find_layers(model)[1]):
            st = _State(i, target, spec, record)
            attn = block.get_submodule(ATTN[arch])
            attn._authors_state = st
            saved.append((attn, "_authors_state"))
            if target is not None and table[target][0] is not None:
                path, part = table[target]
                patch(block.get_submodule(path), lambda m, x, _st=st, _p=part: _emulated_forward(m, x, _st, _p))
            if record is not None:
                for name, (path, part) in table.items():
                    if path is not None:
                        handles.append(block.get_submodule(path).register_forward_hook(
                            lambda m, a, y, _k=(i, name), _p=part: record.__setitem__(
                                _k, (y if _p is None else y[..., _p * (y.shape[-1] // 3):(_p + 1) * (y.shape[-1] // 3)])
                                .detach().clone())))
            if resid_scale != 1.0:
                for sub in (attn, block.mlp):
                    handles.append(sub.register_forward_hook(
                        lambda m, a, y: (y[0] * resid_scale, *y[1:]) if isinstance(y, tuple) else y * resid_scale))
            handles.append(block.get_submodule(PRE_LN2[arch]).register_forward_pre_hook(
                lambda m, a, _i=i: captured.__setitem__((_i, "pre_ln2"), a[0].detach().clone())))
            handles.append(block.register_forward_hook(
                lambda m, a, y, _i=i: captured.__setitem__((_i, "block_out"),
                                                           (y[0] if isinstance(y, tuple) else y).detach().clone())))
        yield captured
    finally:
        for h in handles:
            h.remove()
        for mod, fwd in reversed(saved):
            if fwd == "_authors_state":
                del mod._authors_state
            elif fwd is None:
                del mod.forward
            else:
                mod.forward = fwd
        model.config._attn_implementation = old_impl


@torch.no_grad()
def forward_points(model: torch.nn.Module, ids: torch.Tensor, target: str | None = None,
                   spec: GemmSpec | None = None, resid_scale: float = 1.0,
                   record: dict | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """The residual stream at ``POINTS`` of every block ((layer, point) -> (B, T, d)) for token ids (B, T)."""
    with instrument(model, target, spec, resid_scale, record) as captured:
        model.base_model(input_ids=ids, use_cache=False)
    return captured


def token_quantiles(ref: dict, test: dict, quantiles: list[float]) -> dict[tuple[int, str, str], dict[str, float]]:
    """(layer, point, metric) -> {"p01": ..., ...}: quantiles over tokens of the per-token errors (rel_comp =
    max_i |x̂_i - x_i| / |x_i|, 0 where x_i = 0; rel_linf = ‖x̂ - x‖∞ / ‖x‖∞)."""
    out = {}
    qs = torch.tensor(quantiles, dtype=torch.float64)
    for key, r in ref.items():
        errs = token_errors(r.double(), test[key].double())
        for metric in METRICS:
            v = errs[metric]
            vals = torch.quantile(v, qs) if torch.isfinite(v).all() else torch.full_like(qs, math.inf)
            out[(*key, metric)] = {f"p{round(q * 100):02d}": float(x) for q, x in zip(quantiles, vals)}
    return out


# ------------------------------------------------------------------------------------------ models
@torch.no_grad()
def reset_weights(model: torch.nn.Module, linear: bool, resid_proj: bool, biases: bool, norms: bool, seed: int,
                  n_layer: int | None = None) -> None:
    """The authors' reset of the block weights to an initialisation: GEMM weights N(0, 1/d_in) (``linear``),
    residual projections (o / down / c_proj) with std × 1/√(2·n_layer) (``resid_proj``, with ``linear``),
    biases 0 (``biases``), norm weights 1 and biases 0 (``norms``). Embeddings stay."""
    if resid_proj and not linear:
        raise ValueError("reset_resid_proj scales the reset init: it needs reset_linear")
    layers = find_layers(model)[1]
    n_layer = n_layer or len(layers)
    g = torch.Generator().manual_seed(seed)
    for block in layers:
        for name, mod in block.named_modules():
            is_gemm = isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"
            if is_gemm and linear:
                d_in = mod.weight.shape[0] if type(mod).__name__ == "Conv1D" else mod.weight.shape[1]
                std = d_in ** -0.5 * ((2 * n_layer) ** -0.5 if resid_proj and name.split(".")[-1] in RESID_PROJ else 1)
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * std)
            if is_gemm and biases and getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
            if norms and (isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm")):
                mod.weight.fill_(1.0)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()


def truncate_layers(model: torch.nn.Module, n: int) -> None:
    """Keep the first ``n`` decoder blocks (0 = all): the sweep measures inside blocks only."""
    name, layers = find_layers(model)
    if n <= 0 or n >= len(layers):
        return
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, torch.nn.ModuleList(layers[:n]))
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(model.config, key):
            setattr(model.config, key, n)


def token_windows(text: str, tok, n_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_seqs`` windows of ``seq_len`` tokens at seeded random offsets of the tokenised ``text``: (n, T)."""
    ids = torch.tensor(tok(text).input_ids, dtype=torch.long)
    if len(ids) <= seq_len:
        raise ValueError(f"authors_sweep: the text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_seqs,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def read_text(path: Path, max_chars: int) -> str:
    """A UTF-8 text file, or the sorted .txt files of a folder concatenated (OpenWebText-style dumps)."""
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    parts, n = [], 0
    for f in files:
        parts.append(f.read_text(encoding="utf-8", errors="replace"))
        n += len(parts[-1])
        if n >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


# ------------------------------------------------------------------------------------------- stage
def sweep_jobs(c, arch: str) -> list[tuple[str, str, int, float, str]]:
    """(mode, target, p, resid_scale, resid_kind) of the main sweep and the residual-scale sub-sweep."""
    targets = list(TARGETS[arch]) if c.targets == ["all"] else c.targets
    rtargets = list(TARGETS[arch]) if c.resid_targets == ["all"] else c.resid_targets
    for t in set(targets) | set(rtargets):
        if t not in TARGETS[arch]:
            raise ValueError(f"authors_sweep: unknown target '{t}' for {arch}; known: {list(TARGETS[arch])}")
    jobs = [(m, t, p, 1.0, "none") for m in c.modes for t in targets for p in c.mantissa_bits]
    jobs += [(m, t, c.resid_mantissa_bits, s, kind) for m in c.modes for t in rtargets for s in c.resid_scales
             for kind in c.resid_kinds if s != 1.0]
    return jobs


def _variant(base64: torch.nn.Module, scale: float, kind: str) -> tuple[torch.nn.Module, float]:
    """(float64 model, forward multiplier) of one residual-scale variant."""
    if kind == "weights":
        from exp_roundoff.models import scale_residual_projections

        m = copy.deepcopy(base64)
        scale_residual_projections(m, scale)
        return m, 1.0
    return base64, scale


def run_sweep(cfg, ctx, text: str, device: torch.device) -> dict:
    """The stage body: load, prepare, sweep, log rows; returns the p50 rel_linf at the last block's output per
    (reference, mode, target, p, resid_scale, resid_kind)."""
    from common.models import load_causal_lm

    c = cfg.authors
    model64, tok = load_causal_lm(c.model, dtype=torch.float64)
    model64 = model64.eval()
    arch = arch_of(model64)
    n_layer_full = len(find_layers(model64)[1])
    truncate_layers(model64, c.n_layers)
    if c.reset_linear or c.reset_biases or c.reset_norms:
        reset_weights(model64, c.reset_linear, c.reset_resid_proj, c.reset_biases, c.reset_norms, cfg.seed,
                      n_layer=n_layer_full)
    model64.to(device)
    ids = token_windows(text, tok, c.n_seqs, c.seq_len, cfg.seed).to(device)
    n_kept = len(find_layers(model64)[1])
    jobs = sweep_jobs(c, arch)
    summary: dict = {}
    models: dict = {}     # weight variant -> (float64 model, float32 copy); forward scaling shares the base
    refs: dict = {}       # (scale, kind) -> (float32 model, multiplier, float64 reference points)
    fp32_ref: dict = {}   # (mode, target, scale, kind) -> points at p = 23 (the fp32 reference)

    def spec(mode: str, p: int) -> GemmSpec:
        return GemmSpec(p=p, mode=mode, block_k=c.block_k if mode == "efficient" else 1, tf32=c.tf32_operands,
                        tf32_rounding=c.tf32_rounding, fma=c.strict_fma)

    for mode, target, p, scale, kind in jobs:
        if (scale, kind) not in refs:
            wkey = (scale, kind) if kind == "weights" else None
            if wkey not in models:
                m64, _ = _variant(model64, scale, kind) if wkey else (model64, 1.0)
                models[wkey] = (m64, copy.deepcopy(m64).float())
            m64, m32 = models[wkey]
            mult = 1.0 if wkey else scale
            refs[(scale, kind)] = (m32, mult, forward_points(m64, ids, resid_scale=mult))
        m32, mult, ref64 = refs[(scale, kind)]
        key32 = (mode, target, scale, kind)
        if "fp32" in c.references and key32 not in fp32_ref:
            fp32_ref[key32] = forward_points(m32, ids, target, spec(mode, FP32_MAN), mult)
        test = fp32_ref[key32] if p == FP32_MAN and key32 in fp32_ref else forward_points(
            m32, ids, target, spec(mode, p), mult)
        for ref_name in c.references:
            ref = ref64 if ref_name == "fp64" else fp32_ref[key32]
            for (layer, point, metric), qv in token_quantiles(ref, test, c.quantiles).items():
                params = {"model": c.model, "arch": arch, "mode": mode, "target": target, "p": p,
                          "u": 2.0 ** -(p + 1), "reference": ref_name, "layer": layer, "point": point,
                          "resid_scale": scale, "resid_kind": kind, "n_tokens": int(ids.numel())}
                for qname, v in qv.items():
                    ctx.log(table="authors_sweep", method=target, metric=f"{metric}_{qname}", value=v,
                            n=int(ids.numel()), params=params)
                if layer == n_kept - 1 and point == "block_out" and metric == "rel_linf" and "p50" in qv:
                    summary[(ref_name, mode, target, p, scale, kind)] = qv["p50"]
    return summary


def stage_authors_sweep(ctx) -> None:
    """Stage ``authors_sweep`` of exp_roundoff/run.py: rows of table ``authors_sweep`` and a summary.json."""
    from common.config import default_data_dir
    from common.data import DatasetNotAvailableError
    from common.models import ModelNotAvailableError

    cfg, c = ctx.cfg, ctx.cfg.authors
    if c.model.lower() == "none":  # as depth.real_model=none: tiny test configs skip the pretrained model
        print("[exp_roundoff] authors_sweep: authors.model=none, nothing to do")
        ctx.save_json("summary.json", {"authors_sweep_skipped": [["authors.model=none", 1]]})
        return
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    try:
        root = default_data_dir()
        rel = c.data_path or f"text/{cfg.corpus}"
        path = Path(rel) if Path(rel).is_absolute() else (Path(root) / rel if root is not None else None)
        if path is None or not path.exists():
            raise DatasetNotAvailableError(f"authors.data_path: '{rel}' not found (data root: {root}); put an "
                                           "OpenWebText-style text file or folder of .txt files there")
        text = read_text(path, c.max_chars)
        summary = run_sweep(cfg, ctx, text, device)
    except (DatasetNotAvailableError, ModelNotAvailableError, OSError) as err:
        if c.if_missing != "skip":
            raise
        # a completed, empty stage: after adding the data, rerun with --force --stage authors_sweep
        print(f"[exp_roundoff] authors_sweep skipped: {err}")
        ctx.save_json("summary.json", {"authors_sweep_skipped": [[str(err), 1]]})
        return
    # run.load_summary's layout: section -> [[key..., value], ...]
    ctx.save_json("summary.json", {"authors_sweep": [[*k, v] for k, v in summary.items()]})

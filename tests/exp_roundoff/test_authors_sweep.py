"""The authors' mantissa sweep (exp_roundoff/authors_sweep.py): rounding and GEMM against exact oracles, the
instrumented model against its own native GEMMs, and the stage's rows on a tiny random model."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from common.lowp import quantize
from exp_roundoff import authors_sweep as A
from exp_roundoff.config import STAGES, Config
from exp_roundoff.models import build_model, scale_residual_projections

PS = [1, 2, 3, 7, 10, 16, 22, 23]


# --------------------------------------------------------------------------------------------- oracle
def oracle_round(x: float, p: int, mode: str = "rne") -> float:
    """Exact rounding of a float32 value to p fraction bits, fp32's exponent range (emin = -126, subnormals
    with quantum 2^(-126-p), overflow past (2 - 2^-p) 2^127 to inf), by rational arithmetic."""
    if x == 0 or not math.isfinite(x):
        return x
    _, e = math.frexp(abs(x))                       # |x| = m 2^e, m in [0.5, 1)
    q = Fraction(2) ** (max(e - 1, -126) - p)       # the quantum of |x|'s binade (fixed below 2^-126)
    n = Fraction(abs(x)) / q
    k = round(n) if mode == "rne" else math.floor(n)  # round() of a Fraction is half-to-even
    v = k * q
    if v > (2 - Fraction(2) ** -p) * Fraction(2) ** 127:
        return math.copysign(math.inf, x)
    return math.copysign(float(v), x)


def bits_of(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int32).numpy()


def random_float32(n: int, seed: int) -> torch.Tensor:
    """Random finite float32 bit patterns over every exponent (subnormals and the top binade included)."""
    g = np.random.default_rng(seed)
    bits = g.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    exp = (bits >> 23) & 0xFF
    bits = bits[exp != 0xFF]
    return torch.from_numpy(bits.view(np.int32).copy()).view(torch.float32)


def ties_and_neighbours(p: int, n: int, seed: int) -> torch.Tensor:
    """Exact midpoints between two p-bit neighbours (odd and even kept LSB), one float32 ulp either side."""
    r = 23 - p
    g = np.random.default_rng(seed)
    bits = g.integers(0, 0x7F000000, n, dtype=np.int64)
    bits = (bits & ~((1 << r) - 1)) | (1 << (r - 1))
    sign = g.integers(0, 2, n, dtype=np.int64) << 31
    allb = np.concatenate([bits, bits - 1, bits + 1]) | np.concatenate([sign] * 3)
    return torch.from_numpy(allb.astype(np.uint32).view(np.int32)).view(torch.float32)


@pytest.mark.parametrize("p", PS)
def test_round_mantissa_is_bit_exact_against_the_rational_oracle(p):
    x = random_float32(3000, seed=p)
    if p < 23:
        x = torch.cat([x, ties_and_neighbours(p, 400, seed=100 + p)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, -1.5, 2.0**-149, -(2.0**-126), 3.4028234663852886e38])])
    for mode, fn in (("rne", A.round_mantissa), ("rz", lambda t, q: A.round_bits(t, q, "rz"))):
        got = fn(x.clone(), p)
        want = torch.tensor([oracle_round(v, p, mode) for v in x.tolist()], dtype=torch.float32)
        bad = np.flatnonzero(bits_of(got) != bits_of(want))
        assert bad.size == 0, f"{mode} p={p}: {bad.size} mismatches, e.g. {x[bad[:3]].tolist()}"
    # the same function as common.lowp's "fp32 range, p fraction bits" format
    assert np.array_equal(bits_of(A.round_mantissa(x, p)), bits_of(quantize(x, (8, p), backend="torch")))


def test_round_mantissa_specials_and_overflow():
    x = torch.tensor([math.inf, -math.inf, math.nan, 3.4028234663852886e38, -3.4e38, 2.0**-149])
    y = A.round_mantissa(x, 3)
    assert y[0] == math.inf and y[1] == -math.inf and torch.isnan(y[2])
    assert y[3] == math.inf and y[4] == -math.inf     # rounds past (2 - 2^-3) 2^127
    # a NaN whose payload sits only in the discarded bits stays NaN (not inf)
    nan_low = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(A.round_mantissa(nan_low, 3)).all() and torch.isnan(A.round_bits(nan_low, 10, "rz")).all()
    assert torch.equal(A.round_mantissa(x, 23)[[0, 1, 3, 4, 5]], x[[0, 1, 3, 4, 5]])


# ----------------------------------------------------------------------------------------------- GEMM
def oracle_gemm(a: np.ndarray, b: np.ndarray, p: int, block: int, exact_blocks: bool) -> np.ndarray:
    """Element by element: acc = round_p(fp32(acc + s)) with s = fp32(a_k b_k) (strict) or the exact sum of a
    block's products (the caller makes it exact in fp32)."""
    m, k = a.shape
    out = np.zeros((m, b.shape[1]), dtype=np.float32)
    for i in range(m):
        for j in range(b.shape[1]):
            acc = np.float32(0.0)
            for k0 in range(0, k, block):
                if exact_blocks:
                    s = np.float32(sum(Fraction(float(a[i, t])) * Fraction(float(b[t, j]))
                                       for t in range(k0, min(k0 + block, k))))
                else:
                    s = np.float32(a[i, k0] * b[k0, j])
                acc = np.float32(oracle_round(float(np.float32(acc + s)), p))
            out[i, j] = acc
    return out


@pytest.mark.parametrize("p", [2, 5, 10, 23])
def test_strict_gemm_matches_the_oracle(p):
    g = torch.Generator().manual_seed(p)
    a, b = torch.randn(3, 40, generator=g), torch.randn(40, 4, generator=g)
    got = A.authors_gemm(a, b, A.GemmSpec(p=p, mode="strict"))
    want = oracle_gemm(a.numpy(), b.numpy(), p, 1, exact_blocks=False)
    assert np.array_equal(bits_of(got), want.view(np.int32))


@pytest.mark.parametrize("p", [1, 3, 6])
def test_efficient_gemm_rounds_after_each_block(p):
    # small integers: TF32 keeps them and every block sum is exact, so only the accumulator rounding is left
    g = torch.Generator().manual_seed(p)
    a = torch.randint(-8, 9, (4, 70), generator=g).float()
    b = torch.randint(-8, 9, (70, 5), generator=g).float()
    for block in (8, 32):
        got = A.authors_gemm(a, b, A.GemmSpec(p=p, mode="efficient", block_k=block))
        want = oracle_gemm(a.numpy(), b.numpy(), p, block, exact_blocks=True)
        assert np.array_equal(bits_of(got), want.view(np.int32))
    # batched operands (attention GEMMs) give the same as one matrix at a time
    a3, b3 = torch.randn(2, 3, 6, 16, generator=g), torch.randn(2, 3, 16, 5, generator=g)
    spec = A.GemmSpec(p=p, mode="efficient", block_k=8)
    assert torch.equal(A.authors_gemm(a3, b3, spec)[1, 2], A.authors_gemm(a3[1, 2], b3[1, 2], spec))


def test_efficient_gemm_uses_tf32_operands():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 64, generator=g), torch.randn(64, 3, generator=g)
    spec = A.GemmSpec(p=23, mode="efficient", tf32_rounding="rz")
    at, bt = (A.round_bits(t, 10, "rz").double() for t in (a, b))
    exact_tf32 = at @ bt
    got = A.authors_gemm(a, b, spec).double()
    # within fp32 accumulation of the TF32 product, far from the fp32 product
    assert ((got - exact_tf32).abs() / exact_tf32.abs()).max() < 1e-5
    assert not torch.equal(A.authors_gemm(a, b, spec), A.authors_gemm(a, b, A.GemmSpec(p=23, tf32=False)))


# ------------------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request):
    arch = request.param
    m64 = build_model(arch, vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=32,
                      n_kv_heads=2 if arch == "llama" else None, seed=0)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    return arch, m64, copy.deepcopy(m64).float(), ids


def test_uninstrumented_points_match_the_models_own_forward(tiny):
    arch, m64, m32, ids = tiny
    for m in (m64, m32):
        with torch.no_grad():
            hs = m.base_model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        pts = A.forward_points(m, ids)
        # HF's LlamaRMSNorm computes in float32 even in a float64 model (the sweep's reference does not)
        tol = 1e-5 if m is m32 else (1e-6 if arch == "llama" else 1e-12)
        # (hidden_states[-1] is after the final norm: block 0 of the 2-block model is compared)
        assert torch.allclose(pts[(0, "block_out")], hs[1], rtol=tol, atol=tol)


def _native_hooks(model, skip: set[int]):
    """Forward hooks asserting that every GEMM module not in ``skip`` computes its native fp32 product."""
    bad = []

    def check(mod, args, y):
        x = args[0].reshape(-1, args[0].shape[-1])
        if type(mod).__name__ == "Conv1D":
            want = torch.addmm(mod.bias, x, mod.weight)
        else:
            want = torch.nn.functional.linear(x, mod.weight, mod.bias)
        if not torch.equal(y.reshape(want.shape), want):
            bad.append(mod)

    handles = [m.register_forward_hook(check) for m in model.modules()
               if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and id(m) not in skip]
    return handles, bad


@pytest.mark.parametrize("mode", ["efficient", "strict"])
def test_only_the_target_gemm_changes(tiny, mode):
    arch, _, m32, ids = tiny
    table = A.TARGETS[arch]
    overlap = {"qkv": {"q", "k", "v"}, "q": {"qkv"}, "k": {"qkv"}, "v": {"qkv"}}
    for target, (path, _) in table.items():
        targeted = {id(b.get_submodule(path)) for b in A.find_layers(m32)[1]} if path else set()
        base, test = {}, {}
        A.forward_points(m32, ids, target, A.GemmSpec(p=23, mode=mode), record=base)
        handles, bad = _native_hooks(m32, skip=targeted)
        try:
            A.forward_points(m32, ids, target, A.GemmSpec(p=4, mode=mode), record=test)
        finally:
            for h in handles:
                h.remove()
        assert not bad, f"target {target}: a non-target GEMM module was not native"
        assert not torch.equal(test[(0, target)], base[(0, target)]), f"target {target} unchanged"
        for name, stage in A.GEMM_STAGE.items():
            if name in table and name != target and name not in overlap.get(target, ()) \
                    and stage <= A.GEMM_STAGE[target]:
                assert torch.equal(test[(0, name)], base[(0, name)]), f"target {target} changed {name}"


def test_fp32_reference_error_is_zero_at_p23_and_not_below(tiny):
    arch, _, m32, ids = tiny
    for target in ("scores", "down" if arch == "llama" else "proj"):
        for mode in ("efficient", "strict"):
            ref = A.forward_points(m32, ids, target, A.GemmSpec(p=23, mode=mode))
            same = A.forward_points(m32, ids, target, A.GemmSpec(p=23, mode=mode))
            q = A.token_quantiles(ref, same, [0.01, 0.5, 0.99])
            assert all(v == 0.0 for d in q.values() for v in d.values())
            lower = A.token_quantiles(ref, A.forward_points(m32, ids, target, A.GemmSpec(p=20, mode=mode)), [0.5])
            assert lower[(1, "block_out", "rel_linf")]["p50"] > 0


def test_error_decreases_with_mantissa_bits(tiny):
    arch, m64, m32, ids = tiny
    ref64 = A.forward_points(m64, ids)
    for target in ("q", "scores", "value", "o"):
        for mode in ("efficient", "strict"):
            ref = A.forward_points(m32, ids, target, A.GemmSpec(p=23, mode=mode))
            errs, errs64 = [], []
            for p in (3, 7, 11):  # above p ~ 14 the error meets the fp32 floor of the ops downstream
                test = A.forward_points(m32, ids, target, A.GemmSpec(p=p, mode=mode))
                errs.append(A.token_quantiles(ref, test, [0.5])[(1, "block_out", "rel_linf")]["p50"])
                errs64.append(A.token_quantiles(ref64, test, [0.5])[(1, "pre_ln2", "rel_comp")]["p50"])
            # 4 more bits: ~16x smaller; a factor 2 per step leaves room for the statistics
            assert all(b < a / 2 for a, b in zip(errs, errs[1:])), (target, mode, errs)
            # against float64 the fp32 floor is reached eventually: never increasing by much
            assert errs64[-1] < errs64[0] / 10 and all(b < 2 * a for a, b in zip(errs64, errs64[1:]))


def test_forward_multiplier_equals_weight_scaling(tiny):
    _, m64, _, ids = tiny
    scaled = copy.deepcopy(m64)
    scale_residual_projections(scaled, 4.0)
    fwd = A.forward_points(m64, ids, resid_scale=4.0)
    wts = A.forward_points(scaled, ids)
    plain = A.forward_points(m64, ids)
    for key in fwd:
        assert torch.allclose(fwd[key], wts[key], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fwd[(1, "block_out")], plain[(1, "block_out")])


def test_reset_weights_follows_the_authors_init():
    m = build_model("gpt2", vocab_size=64, d_model=64, n_layers=2, n_heads=4, seq_len=32, seed=0)
    A.reset_weights(m, linear=True, resid_proj=True, biases=True, norms=True, seed=0, n_layer=2)
    block = A.find_layers(m)[1][0]
    assert abs(block.attn.c_attn.weight.std().item() * 64 ** 0.5 - 1) < 0.05
    assert abs(block.mlp.c_proj.weight.std().item() * (256 * 4) ** 0.5 - 1) < 0.05   # 1/sqrt(d_in) / sqrt(2 L)
    assert block.attn.c_attn.bias.abs().max() == 0 and torch.all(block.ln_1.weight == 1)
    with pytest.raises(ValueError):
        A.reset_weights(m, linear=False, resid_proj=True, biases=False, norms=False, seed=0)


# ------------------------------------------------------------------------------------------- the stage
class _Ctx:
    def __init__(self, cfg):
        self.cfg, self.rows = cfg, []

    def log(self, **row):
        self.rows.append(row)


class _ByteTok:
    def __call__(self, text):
        return type("Enc", (), {"input_ids": [b % 64 for b in text.encode()]})()


def test_stage_rows_on_a_tiny_model(monkeypatch):
    import common.models

    m = build_model("llama", vocab_size=64, d_model=32, n_layers=3, n_heads=4, seq_len=32, seed=0)
    monkeypatch.setattr(common.models, "load_causal_lm", lambda name, dtype: (copy.deepcopy(m), _ByteTok()))
    cfg = Config()
    cfg.validate()
    c = cfg.authors
    c.n_layers, c.seq_len, c.targets, c.mantissa_bits = 2, 12, ["k", "value"], [6, 23]
    c.resid_targets, c.resid_scales = ["o"], [1.0, 4.0]
    ctx = _Ctx(cfg)
    summary = A.run_sweep(cfg, ctx, "some offline text " * 20, torch.device("cpu"))
    n_jobs = len(A.sweep_jobs(c, "llama"))
    assert n_jobs == 2 * 2 * 2 + 2 * 1 * 1 * 2   # main sweep + scale 4 x two kinds (scale 1 is the main sweep)
    assert len(ctx.rows) == n_jobs * 2 * 2 * 2 * 2 * len(c.quantiles)   # refs x layers x points x metrics
    zero = [r["value"] for r in ctx.rows if r["params"]["reference"] == "fp32" and r["params"]["p"] == 23]
    assert zero and all(v == 0.0 for v in zero)
    assert all(r["value"] > 0 for r in ctx.rows if r["params"]["reference"] == "fp64" and r["metric"].endswith("p50"))
    assert summary and "authors_sweep" in STAGES
    # the report's figure draws from these rows (the params expanded as results.csv's loader does)
    import matplotlib.figure
    import pandas as pd

    from exp_roundoff.figures import authors_sweep

    rows = pd.DataFrame([{"table": "authors_sweep", "run_id": "r", "method": r["method"], "metric": r["metric"],
                          "value": r["value"], **{f"p.{k}": v for k, v in r["params"].items()}} for r in ctx.rows])
    assert isinstance(authors_sweep(rows), matplotlib.figure.Figure)


def test_stage_summary_loads_and_missing_data_skips(monkeypatch, tmp_path):
    import json

    import common.models
    from exp_roundoff.run import load_summary

    m = build_model("llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=32, seed=0)
    monkeypatch.setattr(common.models, "load_causal_lm", lambda name, dtype: (copy.deepcopy(m), _ByteTok()))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "t.txt").write_text("offline text for the sweep " * 30, encoding="utf-8")
    monkeypatch.setenv("LLM4ALL_DATA", str(tmp_path))

    class Ctx(_Ctx):
        def save_json(self, name, obj):
            (tmp_path / name).write_text(json.dumps(obj), encoding="utf-8")

    cfg = Config()
    c = cfg.authors
    c.data_path, c.n_layers, c.seq_len, c.targets, c.mantissa_bits = "text/t.txt", 1, 8, ["up"], [5]
    c.modes, c.resid_scales = ["efficient"], [1.0]
    ctx = Ctx(cfg)
    A.stage_authors_sweep(ctx)
    summary = load_summary(tmp_path)["authors_sweep"]
    assert set(summary) == {("fp64", "efficient", "up", 5, 1.0, "none"), ("fp32", "efficient", "up", 5, 1.0, "none")}
    assert ctx.rows
    c.data_path, c.if_missing = "text/missing_owt", "skip"
    skipped = Ctx(cfg)
    A.stage_authors_sweep(skipped)
    assert not skipped.rows and "authors_sweep_skipped" in load_summary(tmp_path)
    c.if_missing = "error"
    from common.data import DatasetNotAvailableError

    with pytest.raises(DatasetNotAvailableError):
        A.stage_authors_sweep(Ctx(cfg))
    c.model = "none"   # what a tiny whole-experiment test passes
    none = Ctx(cfg)
    A.stage_authors_sweep(none)
    assert not none.rows and "authors_sweep_skipped" in load_summary(tmp_path)

"""quantize(): bit-exact against ml_dtypes, torch casts and an exact rational oracle; stochastic rounding."""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

from common.lowp import FORMATS, FloatFormat, get_format, quantize
from common.lowp.reference import round_general
from tests.lowp.lowp_oracle import assert_same, edge_values, round_exact, same_bits

ML_DTYPES = {
    "bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2, "fp8_e4m3": ml_dtypes.float8_e4m3, "fp8_e3m4": ml_dtypes.float8_e3m4,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn, "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn_sat": torch.float8_e4m3fn,
                "fp8_e5m2": torch.float8_e5m2}
MODES = ["rne", "rz", "ru", "rd"]


def edge_array(fmt: FloatFormat, dtype=np.float32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = 24 if dtype == np.float32 else 53
    with np.errstate(over="ignore"):
        return np.array(edge_values(fmt, rng, dtype_bits=bits), dtype=np.float64).astype(dtype)


@pytest.mark.parametrize("backend", ["torch", "auto"])  # auto = torch's own cast for bf16/fp16
@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_rne_matches_ml_dtypes(name, backend):
    fmt = get_format(name)
    x = edge_array(fmt)
    rng = np.random.default_rng(1)
    x = np.concatenate([x, (rng.standard_normal(20000) * 10.0 ** rng.uniform(-9, 6, 20000)).astype(np.float32)])
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(ML_DTYPES[name]).astype(np.float32)
    if fmt.specials == "none":  # ml_dtypes maps NaN to ±0 in formats without NaN; we keep NaN
        keep = ~np.isnan(x)
        x, want = x[keep], want[keep]
    got = quantize(torch.from_numpy(x), fmt, backend=backend).numpy()
    assert_same(got, want, x, f"{name} ({backend}) vs ml_dtypes {ml_dtypes.__version__}")


@pytest.mark.parametrize("name", sorted(TORCH_DTYPES))
def test_rne_matches_torch_cast_in_range(name):
    fmt = get_format(name)
    x = edge_array(fmt, seed=2)
    x = x[np.isfinite(x) & (np.abs(x) <= fmt.max_normal)]
    xt = torch.from_numpy(x)
    want = xt.to(TORCH_DTYPES[name]).float().numpy()
    assert_same(quantize(xt, fmt, backend="torch").numpy(), want, x, f"{name} vs torch {torch.__version__} cast")


@pytest.mark.parametrize("name", ["fp8_e4m3fn", "fp8_e4m3fn_sat", "fp8_e5m2", "fp8_e5m2_sat", "fp16", "bf16",
                                  "fp4_e2m1", "fp6_e3m2"])
def test_overflow_policy(name):
    """Overflow is a parameter: NaN (e4m3fn, ml_dtypes), saturate (torch CPU e4m3fn cast), inf (IEEE)."""
    fmt = get_format(name)
    top_ulp = math.ldexp(1.0, fmt.emax - fmt.man_bits)
    over = [fmt.max_normal + top_ulp, 2 * fmt.max_normal, math.inf]
    x = torch.tensor(over + [-v for v in over], dtype=torch.float64)
    expect = {"inf": math.inf, "saturate": fmt.max_normal, "nan": math.nan}[fmt.overflow]
    got = quantize(x, fmt).numpy()
    want = np.array([expect] * 3 + [-expect] * 3)
    assert same_bits(got, want).all(), (name, got)
    # Just past the rounding boundary stays finite; the RNE tie at max + half ulp overflows (odd max).
    if fmt.specials != "fn":
        below = torch.tensor([fmt.max_normal + top_ulp / 2 * 0.99, fmt.max_normal + top_ulp / 2])
        assert quantize(below, fmt)[0].item() == fmt.max_normal
        assert same_bits(quantize(below, fmt)[1:].numpy(), np.array([expect], np.float32)).all()
    # Directed rounding toward zero never overflows (IEEE 754).
    assert quantize(x[:2], fmt, mode="rz").tolist() == [fmt.max_normal] * 2
    assert quantize(x[3:5], fmt, mode="ru").tolist() == [-fmt.max_normal] * 2


def test_torch_float8_overflow_recorded():
    """torch's own e4m3fn cast saturates on this version/device; we model it with fp8_e4m3fn_sat."""
    x = torch.tensor([500.0, 1e9, -1e9])
    native = x.to(torch.float8_e4m3fn).float()
    ours = quantize(x, "fp8_e4m3fn_sat")
    if torch.isnan(native).any():
        pytest.skip(f"torch {torch.__version__} e4m3fn cast gives NaN on overflow; use fp8_e4m3fn there")
    assert torch.equal(native, ours), (torch.__version__, native, ours)


CUSTOM = [FloatFormat("e3m3", 3, 3), FloatFormat("e5m4_nosub", 5, 4, subnormals=False),
          FloatFormat("e4m2_b4_sat", 4, 2, bias=4, overflow="saturate"), FloatFormat("e6m5", 6, 5),
          FloatFormat("e8m13", 8, 13), FloatFormat("e6m23", 6, 23), FloatFormat("fp32_nosub", 8, 23, subnormals=False),
          FloatFormat("fp32_sat", 8, 23, overflow="saturate")]


@pytest.mark.parametrize("fmt", [FORMATS[n] for n in ["bf16", "fp16", "tf32", "fp8_e4m3fn", "fp8_e5m2",
                                                      "fp6_e2m3", "fp4_e2m1"]] + CUSTOM, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_modes_match_exact_oracle(fmt, dtype):
    x = edge_array(fmt, dtype=dtype, seed=3)
    xt = torch.from_numpy(x)
    for mode in MODES:
        want = np.array([round_exact(float(v), fmt, mode) for v in x], dtype=np.float64).astype(dtype)
        assert_same(quantize(xt, fmt, mode=mode, backend="torch").numpy(), want, x, f"{fmt} {mode} {x.dtype}")
        if fmt.fits_in(FORMATS["fp32"]) or dtype == np.float64:  # the general routine on its own, too
            assert_same(round_general(xt, fmt, mode, None).numpy(), want, x, f"general {fmt} {mode}")


@pytest.mark.parametrize("fmt", [FORMATS[n] for n in ["fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2_sat"]]
                         + [FloatFormat("bf16_nosub", 8, 7, subnormals=False), CUSTOM[2]], ids=str)
def test_fast_paths_equal_general_routine(fmt):
    """The fast paths (gather for a few subnormals, whole-tensor for many, same-range shortcut) give the
    general routine's result on realistic data: mostly normal values, some tiny, zero, overflow, specials."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(50_000, generator=g)
    few = torch.cat([base, base[:20] * fmt.min_normal, torch.tensor([0.0, -0.0, 1e30, -1e30, float("nan"),
                                                                    float("inf"), fmt.max_normal * 1.01])])
    many = torch.cat([few, base * fmt.min_normal])
    for x in (few, many, few.double()):
        for mode in MODES:
            want = round_general(x, fmt, mode, None)
            got = quantize(x, fmt, mode=mode, backend="torch")
            assert_same(got.numpy(), want.numpy(), x.numpy(), f"{fmt} {mode} n={x.numel()} {x.dtype}")


def test_float64_rounds_directly_not_via_float32():
    """1 + 2^-8 + 2^-40 is above the bf16 midpoint; through float32 it would become the tie and go down."""
    x = torch.tensor([1 + 2**-8 + 2**-40, -(1 + 2**-8 + 2**-40), 1 + 2**-8], dtype=torch.float64)
    assert quantize(x, "bf16").tolist() == [1 + 2**-7, -(1 + 2**-7), 1.0]
    assert quantize(x.float(), "bf16").tolist() == [1.0, -1.0, 1.0]  # the double rounding we avoid
    # fp32 itself from float64: RNE like torch's cast, including float32 subnormals and overflow.
    rng = np.random.default_rng(4)
    y = torch.from_numpy(rng.standard_normal(5000) * 10.0 ** rng.uniform(-46, 39, 5000))
    assert_same(quantize(y, "fp32").numpy(), y.float().double().numpy(), y.numpy(), "fp32 from float64")


def test_edge_case_table_bf16():
    """Hand-checked: ties to even, largest subnormal/normal, -0, specials (MPTorch's 20.0625 example)."""
    bf = get_format("bf16")
    cases = [(20.0625, 20.0), (20.06251, 20.125), (1 + 2**-8, 1.0), (1 + 3 * 2**-8, 1 + 2**-6),
             (-0.0, -0.0), (bf.max_normal, bf.max_normal), (2**-126 - 2**-133, 2**-126 - 2**-133),
             (2**-134, 0.0), (3 * 2**-135, 2**-133), (-(2**-134), -0.0), (float("inf"), float("inf"))]
    x = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    got = quantize(x, bf).tolist()
    for (inp, want), g in zip(cases, got):
        assert g == want and math.copysign(1, g) == math.copysign(1, want), (inp, g, want)
    assert math.isnan(quantize(torch.tensor([float("nan")]), bf).item())


def test_presets_and_properties():
    for name in ML_DTYPES:
        if name == "fp16":
            continue
        fi = ml_dtypes.finfo(ML_DTYPES[name])
        fmt = get_format(name)
        assert fmt.max_normal == float(fi.max), name
        assert fmt.min_normal == float(fi.smallest_normal), name
        assert fmt.min_subnormal == float(fi.smallest_subnormal), name
    assert get_format("bf16").unit_roundoff == 2**-8 and get_format("fp16").precision == 11
    assert get_format("fp32").unit_roundoff == 2**-24
    assert get_format((5, 10)).max_normal == 65504.0 and get_format("e8m13").precision == 14
    with pytest.raises(ValueError, match="unknown float format"):
        get_format("fp7")
    with pytest.raises(ValueError, match="overflow='inf' needs"):
        FloatFormat("bad", 2, 1, specials="none", overflow="inf")
    with pytest.raises(ValueError, match="not representable in torch.float32"):
        quantize(torch.ones(3), FloatFormat("e9m5", 9, 5))
    with pytest.raises(ValueError, match="rounding mode"):
        quantize(torch.ones(3), "bf16", mode="nearest")


def test_fixed_points_and_dtypes():
    """Every fp8 value is a fixed point in all modes; bf16/fp16 tensors round in place of their dtype."""
    vals = torch.from_numpy(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    vals = vals[~torch.isnan(vals)]
    for mode in MODES + ["stochastic"]:
        assert torch.equal(quantize(vals, "fp8_e4m3fn", mode=mode, seed=0), vals)
    xb = torch.randn(1000).to(torch.bfloat16)
    yb = quantize(xb, "fp8_e5m2")
    assert yb.dtype == torch.bfloat16 and torch.equal(yb.float(), quantize(xb.float(), "fp8_e5m2"))
    assert torch.equal(quantize(xb, "bf16"), xb)
    x3 = torch.randn(2, 3, 5, dtype=torch.float64)
    assert quantize(x3, "fp16").shape == (2, 3, 5) and torch.equal(quantize(x3, "fp64"), x3)


@pytest.mark.parametrize("name", ["bf16", "fp8_e4m3fn", "fp4_e2m1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stochastic_rounding_unbiased(name, dtype):
    """E[SR(x)] = x. For n samples the mean's std is ulp*sqrt(p(1-p)/n); we allow 5 std (plus the
    2^-23 resolution of the random bits), a false-alarm rate below 1e-6 per value."""
    fmt = get_format(name)
    n = 20000
    lo = 1.0 if name != "fp4_e2m1" else 2.0
    ulp = math.ldexp(1.0, math.frexp(lo)[1] - 1 - fmt.man_bits)
    q = fmt.min_subnormal
    points = [lo + f * ulp for f in (0.25, 0.5, 0.75, 0.1)] + [-(lo + 0.3 * ulp), 0.3 * q, -0.7 * q]
    spacing = [ulp] * 5 + [q, q]
    g = torch.Generator().manual_seed(1234)
    for x0, h in zip(points, spacing):
        x = torch.full((n,), x0, dtype=dtype)
        y = quantize(x, fmt, mode="stochastic", generator=g).double()
        below = math.floor(x0 / h) * h
        assert set(y.unique().tolist()) <= {below, below + h}, (x0, y.unique())
        p = (x0 - below) / h
        tol = 5 * h * math.sqrt(p * (1 - p) / n) + h * 2**-23
        assert abs(y.mean().item() - x0) < tol, (name, x0, y.mean().item(), tol)
    a = quantize(torch.rand(100) + 1, fmt, mode="stochastic", seed=7)
    b = quantize(torch.rand(100, generator=torch.Generator().manual_seed(0)) + 1, fmt, mode="stochastic", seed=7)
    assert torch.equal(quantize(b, fmt, "stochastic", seed=7), quantize(b, fmt, "stochastic", seed=7))
    assert a.shape == b.shape


def test_oracle_self_check():
    """The rational oracle agrees with hand values, so it can judge the implementation."""
    bf = get_format("bf16")
    assert round_exact(Fraction(20.0625), bf, "rne") == 20.0
    assert round_exact(1 + 2**-9, bf, "ru") == 1 + 2**-7 and round_exact(-(1 + 2**-9), bf, "ru") == -1.0
    assert round_exact(1e39, bf, "rne") == math.inf and round_exact(1e39, bf, "rz") == bf.max_normal

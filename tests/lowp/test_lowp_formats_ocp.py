"""The fnuz fp8 formats (e4m3fnuz, e5m2fnuz) and the OCP MX scale e8m0fnu, and the ambiguous short names.

Oracles: ml_dtypes' and torch's own casts (bit for bit, every fp8 code decoded), a decoder written here from
the formats' documented fields, and exact rational rounding (``fractions``) for every mode.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

from common.lowp import FORMATS, FloatFormat, get_format, quantize
from common.lowp.reference import quantize_torch, round_general
from tests.lowp.lowp_oracle import assert_same, round_exact, same_bits

NEW = ["fp8_e4m3fnuz", "fp8_e5m2fnuz", "fp8_e8m0fnu"]
ML = {"fp8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "fp8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
      "fp8_e8m0fnu": ml_dtypes.float8_e8m0fnu}
TORCH = {"fp8_e4m3fnuz": torch.float8_e4m3fnuz, "fp8_e5m2fnuz": torch.float8_e5m2fnuz,
         "fp8_e8m0fnu": torch.float8_e8m0fnu}
MODES = ["rne", "rz", "ru", "rd"]
BACKENDS = ["torch", "numba"]
Q_E8M0 = 2.0**-127


def decode(code: int, name: str) -> float:
    """The value of an 8-bit code by the published layouts (not by FloatFormat): fnuz = sign, exponent field
    with bias 2^(e-1), subnormals at field 0, the single NaN 0x80; e8m0fnu = 2^(code - 127), NaN 0xFF."""
    if name == "fp8_e8m0fnu":
        return math.nan if code == 0xFF else math.ldexp(1.0, code - 127)
    e, m = {"fp8_e4m3fnuz": (4, 3), "fp8_e5m2fnuz": (5, 2)}[name]
    if code == 0x80:
        return math.nan
    sign = -1.0 if code & 0x80 else 1.0
    field, frac = (code >> m) & (2**e - 1), code & (2**m - 1)
    bias = 2 ** (e - 1)
    if field == 0:
        return sign * math.ldexp(frac, 1 - bias - m)
    return sign * math.ldexp(2**m + frac, field - bias - m)


def codes(name: str) -> np.ndarray:
    """All 256 codes decoded by ml_dtypes, as float32."""
    return np.arange(256, dtype=np.uint8).view(ML[name]).astype(np.float32)


def exact(v: float, fmt: FloatFormat, mode: str) -> float:
    """``v`` rounded to ``fmt`` by definition (exact rationals): the shared textbook oracle for fnuz with
    zero results made +0; for the unsigned e8m0 layout, the neighbouring powers of two chosen here."""
    if fmt.specials == "fnuz":
        r = round_exact(v, fmt, mode)
        return 0.0 if r == 0 else r
    assert fmt.specials == "fnu"
    if math.isnan(v) or v <= 0:
        return math.nan  # no sign, no zero
    if math.isinf(v):
        return fmt.max_normal if fmt.overflow == "saturate" else math.nan
    a = Fraction(v)
    lo_e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** lo_e > a:
        lo_e -= 1
    if lo_e < fmt.emin:
        return fmt.min_normal  # below the smallest number: nothing smaller exists
    lo, hi = Fraction(2) ** lo_e, Fraction(2) ** (lo_e + 1)
    if a == lo:
        val = lo
    elif mode == "rne":
        val = hi if a - lo >= hi - a else lo  # a tie: no even neighbour (both significands 1): up
    else:
        val = hi if mode == "ru" else lo  # positive: rd = rz
    if val > Fraction(fmt.max_normal):
        toward_zero = mode in ("rz", "rd")
        return fmt.max_normal if toward_zero or fmt.overflow == "saturate" else math.nan
    return float(val)


def edge_inputs(name: str, seed: int, dtype=np.float32, n_random: int = 6000) -> np.ndarray:
    """Every code, midpoints between neighbouring finite values and their container neighbours, overflow,
    container subnormals, ±0, ±inf, NaN and random values of both signs over the whole range and beyond."""
    rng = np.random.default_rng(seed)
    fmt = get_format(name)
    vals = np.unique(codes(name)[~np.isnan(codes(name))].astype(np.float64))
    vals = np.concatenate([vals, [fmt.max_normal * 2]])  # the midpoint above max_normal too
    mids = (vals[:-1] + vals[1:]) / 2
    out = [vals, mids]
    with np.errstate(over="ignore"):
        mids_c = mids.astype(dtype)
        out += [np.nextafter(mids_c, np.inf).astype(np.float64), np.nextafter(mids_c, -np.inf).astype(np.float64)]
    out.append(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 2.0**-149 * 3, 2.0**-126 * 0.75,
                         fmt.max_normal * 1.0001, 3e38, 1e300, 2.0**-1074, 2.0**-1000]))
    e = rng.uniform(math.log2(fmt.min_subnormal) - 4, math.log2(fmt.max_normal) + 2, n_random)
    out.append(np.exp2(e) * rng.uniform(1, 2, n_random))
    out.append(np.exp2(rng.uniform(-149, 128, n_random // 4)))  # all of float32's range
    x = np.concatenate(out)
    x = np.concatenate([x, -x])
    with np.errstate(over="ignore"):
        return x.astype(dtype)


# ------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("name", NEW)
def test_codes_decode_to_the_format(name):
    """All 256 codes: ml_dtypes and torch decode them alike and as the published layout; FloatFormat's
    properties are those of that value set, and every value is a fixed point of every mode and backend."""
    mine = np.array([decode(c, name) for c in range(256)], dtype=np.float32)
    ml = codes(name)
    th = torch.from_numpy(np.arange(256, dtype=np.uint8)).view(TORCH[name]).float().numpy()
    assert_same(ml, mine, np.arange(256), f"{name}: ml_dtypes decode vs layout")
    assert_same(th, mine, np.arange(256), f"{name}: torch decode vs layout")
    assert int(np.isnan(mine).sum()) == 1  # one NaN code, no inf, no -0
    assert not np.isinf(mine).any() and not (np.signbit(mine) & (mine == 0)).any()
    fmt, fi = get_format(name), ml_dtypes.finfo(ML[name])
    finite = mine[~np.isnan(mine)].astype(np.float64)
    pos = finite[finite > 0]
    assert fmt.max_normal == finite.max() == float(fi.max)
    assert fmt.min_subnormal == pos.min() == float(fi.smallest_subnormal)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert (fmt.has_inf, fmt.has_negative_zero, fmt.signed) == (False, False, name != "fp8_e8m0fnu")
    x = torch.from_numpy(finite.astype(np.float32))
    for backend in BACKENDS:
        for mode in MODES + ["stochastic"]:
            for xx in (x, x.double()):
                got = quantize(xx, name, mode=mode, seed=0, backend=backend)
                assert torch.equal(got, xx), (name, backend, mode, xx.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NEW)
def test_rne_matches_ml_dtypes_and_torch(name, backend):
    """RNE from float32 bit for bit against both casts (NaN on overflow and for ±inf, -0 results to +0).
    Documented differences, e8m0fnu only: torch drops the sign (|x|) and maps 0 to 2^-127 (ml_dtypes and we:
    NaN); both casts send (2^-127, 1.5*2^-127) to 2^-126, where 2^-127 is the nearest (and ours)."""
    x = edge_inputs(name, seed=1)
    with np.errstate(over="ignore", invalid="ignore"):
        want_ml = x.astype(ML[name]).astype(np.float32)
    want_th = torch.from_numpy(x).to(TORCH[name]).float().numpy()
    got = quantize(torch.from_numpy(x), name, backend=backend).numpy()
    keep = np.ones(x.shape, bool)
    if name == "fp8_e8m0fnu":
        quirk = (x > Q_E8M0) & (x < 1.5 * Q_E8M0)
        assert quirk.sum() > 10 and (want_ml[quirk] == 2.0**-126).all() and (want_th[quirk] == 2.0**-126).all()
        assert (got[quirk] == np.float32(Q_E8M0)).all()
        keep &= ~quirk
    assert_same(got[keep], want_ml[keep], x[keep], f"{name} ({backend}) vs ml_dtypes {ml_dtypes.__version__}")
    if name == "fp8_e8m0fnu":
        keep &= x > 0
    assert_same(got[keep], want_th[keep], x[keep], f"{name} ({backend}) vs torch {torch.__version__}")
    # float64 and bfloat16 containers give the same (float32 inputs: no double rounding in the casts).
    assert_same(quantize(torch.from_numpy(x).double(), name, backend=backend).float().numpy(), got, x, "float64")
    xb = torch.from_numpy(x).bfloat16()
    assert_same(quantize(xb, name, backend=backend).float().numpy(),
                quantize(xb.float(), name, backend=backend).numpy(), xb.float().numpy(), "bfloat16")
    assert quantize(xb, name, backend=backend).dtype == torch.bfloat16


def _formats_for_exact() -> list[FloatFormat]:
    fmts = [FORMATS[n] for n in NEW]
    return fmts + [f.with_(name=f.name + "_sat", overflow="saturate") for f in fmts]


@pytest.mark.parametrize("fmt", _formats_for_exact(), ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_modes_match_exact_oracle(fmt, dtype):
    """RNE/RZ/RU/RD (and the saturating variants) against exact rational rounding, both backends and the
    general routine; float64 inputs include midpoints ± 2^-40 relative, which a float32 detour would tie."""
    x = edge_inputs(fmt.name.removesuffix("_sat"), seed=2, dtype=dtype, n_random=1500)
    if dtype == np.float64:
        base = x[np.isfinite(x) & (x != 0)][:3000]
        x = np.concatenate([x, base * (1 + 2.0**-40), base * (1 - 2.0**-40)])
    xt = torch.from_numpy(x)
    for mode in MODES:
        want = np.array([exact(float(v), fmt, mode) for v in x], dtype=np.float64).astype(dtype)
        for backend in BACKENDS:
            assert_same(quantize(xt, fmt, mode=mode, backend=backend).numpy(), want, x, f"{fmt} {mode} {backend}")
        if dtype == np.float64 or fmt.signed:  # e8m0 in float32 goes through float64 (see quantize)
            assert_same(round_general(xt, fmt, mode, None).numpy(), want, x, f"general {fmt} {mode}")


def test_exact_oracle_self_check():
    """The oracle by hand: ties up for e8m0 (as both casts), -0 -> +0 for fnuz, nothing below 2^-127."""
    e8, fz = FORMATS["fp8_e8m0fnu"], FORMATS["fp8_e4m3fnuz"]
    assert [exact(v, e8, "rne") for v in (1.5, 3.0, 1.49, 2.0**-140)] == [2.0, 4.0, 1.0, Q_E8M0]
    assert exact(3.0, e8, "rd") == 2.0 and exact(3.0, e8, "ru") == 4.0 and math.isnan(exact(-1.0, e8, "rne"))
    assert math.isnan(exact(1.5 * 2.0**127, e8, "rne")) and exact(1.5 * 2.0**127, e8, "rz") == 2.0**127
    assert math.copysign(1, exact(-(2.0**-12), fz, "rne")) == 1 and exact(-(2.0**-12), fz, "rd") == -(2.0**-10)
    assert math.isnan(exact(248.0, fz, "rne")) and exact(247.0, fz, "rne") == 240.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stochastic_rounding(backend, dtype):
    """SR is unbiased (mean within 5 standard errors) and stays on the two neighbours; no -0 in fnuz; the
    e8m0 scale gives 2^-127 below it and NaN for x <= 0; both backends draw the same bits."""
    n = 20000
    fz = FORMATS["fp8_e4m3fnuz"]
    q = fz.min_subnormal
    for x0, lo, h in [(1.0 + 0.3 * 0.125, 1.0, 0.125), (-(1.0 + 0.75 * 0.125), -1.125, 0.125),
                      (0.3 * q, 0.0, q), (-0.3 * q, -q, q)]:
        x = torch.full((n,), x0, dtype=dtype)
        y = quantize(x, fz, mode="stochastic", seed=11, backend=backend)
        assert set(y.unique().tolist()) <= {lo, lo + h}
        assert not (torch.signbit(y) & (y == 0)).any()  # -0.3q rounds to +0, never -0
        p = (x0 - lo) / h
        assert abs(y.double().mean().item() - x0) < 5 * h * math.sqrt(p * (1 - p) / n) + h * 2**-23
    e8 = FORMATS["fp8_e8m0fnu"]
    for x0, lo in [(1.25, 1.0), (3.5 * 2.0**100, 2.0**101), (1.9 * 2.0**-127, 2.0**-127)]:
        x = torch.full((n,), x0, dtype=dtype)
        y = quantize(x, e8, mode="stochastic", seed=12, backend=backend)
        assert set(y.unique().tolist()) <= {lo, 2 * lo}
        p = (x0 - lo) / lo
        assert abs(y.double().mean().item() - x0) < 5 * lo * math.sqrt(p * (1 - p) / n) + lo * 2**-23
    special = torch.tensor([2.0**-140, 0.0, -0.0, -1.0, float("inf"), float("nan")], dtype=dtype)
    y = quantize(special, e8, mode="stochastic", seed=1, backend=backend)
    assert y[0].item() == Q_E8M0 and torch.isnan(y[1:]).all()
    x = torch.randn(5000, dtype=dtype) * 100
    for fmt in (fz, e8):
        assert same_bits(quantize(x, fmt, "stochastic", seed=3, backend=backend).numpy(),
                         quantize(x, fmt, "stochastic", seed=3, backend="torch").numpy()).all()


def test_format_checks_and_containers():
    with pytest.raises(ValueError, match="specials='fnu'"):
        FloatFormat("e8m1u", 8, 1, subnormals=False, specials="fnu", overflow="nan")
    with pytest.raises(ValueError, match="specials='fnu'"):
        FloatFormat("e8m0u", 8, 0, specials="fnu", overflow="nan")  # subnormals=True
    with pytest.raises(ValueError, match="overflow='inf' needs"):
        FloatFormat("e4m3z", 4, 3, bias=8, specials="fnuz")
    # e8m0's 2^-127 is a float32 subnormal: the float32 routine alone refuses, quantize rounds in float64.
    with pytest.raises(ValueError, match="not representable in torch.float32"):
        quantize_torch(torch.ones(3), FORMATS["fp8_e8m0fnu"])
    assert quantize(torch.tensor([2.0**-128, 0.75]), "fp8_e8m0fnu").tolist() == [Q_E8M0, 1.0]
    with pytest.raises(ValueError, match="not representable in torch.float16"):
        quantize(torch.ones(3, dtype=torch.float16), "fp8_e8m0fnu")


def test_triton_refuses_what_it_does_not_model():
    """The Triton kernels keep the sign of zero and have a zero: they raise for fnuz/e8m0 (CPU-safe check)."""
    for name in NEW:
        with pytest.raises(ValueError, match="backend='triton' does not model"):
            quantize(torch.ones(3), name, backend="triton")
    triton_kernels = pytest.importorskip("common.lowp.triton_kernels")
    with pytest.raises(ValueError, match="Triton kernels do not model"):
        triton_kernels.round_constants(FORMATS["fp8_e5m2fnuz"], torch.float64, "rne")


# ------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(("alias", "precise"), [
    ("e4m3", ["fp8_e4m3fn", "fp8_e4m3fn_sat", "fp8_e4m3", "fp8_e4m3fnuz"]),
    ("E4M3", ["fp8_e4m3fn", "fp8_e4m3"]),
    ("fp8", ["fp8_e4m3fn", "fp8_e4m3", "fp8_e5m2", "fp8_e5m2fnuz", "fp8_e8m0fnu"]),
    ("e3m2", ["fp6_e3m2", "(3, 2)"]), ("e2m3", ["fp6_e2m3", "(2, 3)"]), ("e2m1", ["fp4_e2m1", "(2, 1)"]),
    ("e8m0", ["fp8_e8m0fnu", "(8, 0)"]),
])
def test_ambiguous_names_raise(alias, precise):
    with pytest.raises(ValueError, match="ambiguous") as err:
        get_format(alias)
    for name in precise:
        assert f"'{name}'" in str(err.value) or name in str(err.value), (alias, name, str(err.value))
    with pytest.raises(ValueError, match="ambiguous"):
        quantize(torch.ones(2), alias)


def test_unambiguous_names_keep_one_meaning():
    for alias, name in [("e4m3fn", "fp8_e4m3fn"), ("e4m3fnuz", "fp8_e4m3fnuz"), ("e5m2fnuz", "fp8_e5m2fnuz"),
                        ("e8m0fnu", "fp8_e8m0fnu"), ("e5m2", "fp8_e5m2"), ("fp4", "fp4_e2m1"), ("bfloat16", "bf16")]:
        assert get_format(alias) is FORMATS[name], alias
    # The generic "e<E>m<M>" reading is IEEE-like, the same numbers as the IEEE-like presets.
    ieee = get_format("e3m4")
    p = FORMATS["fp8_e3m4"]
    assert (ieee.max_normal, ieee.min_subnormal, ieee.specials) == (p.max_normal, p.min_subnormal, p.specials)
    assert get_format("fp8_e4m3").max_normal == 240.0 and get_format("fp8_e4m3fn").max_normal == 448.0


def test_emulated_matmul_with_fnuz_formats():
    """fnuz operands and output in the torch matmul: one exact float64 block (K = 8 products of 4-bit
    significands) then one rounding to the output format, which never gives -0."""
    from common.lowp import emulated_matmul

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 8, generator=g, dtype=torch.float64) * 4
    b = torch.randn(8, 5, generator=g, dtype=torch.float64) * 4
    a[0], a[0, 0], b[0] = 0.0, -(2.0**-10), 2.0**-10  # row 0: -2^-20, below half of e5m2fnuz's 2^-17: zero
    aq, bq = quantize(a, "fp8_e4m3fnuz"), quantize(b, "fp8_e4m3fnuz")
    want = quantize(aq @ bq, "fp8_e5m2fnuz")  # the sum is exact: the products share a coarse grid
    got = emulated_matmul(a, b, in_fmt="fp8_e4m3fnuz", acc_fmt="fp64", out_fmt="fp8_e5m2fnuz", block_k=8,
                          backend="torch")
    assert same_bits(got.double().numpy(), want.numpy()).all()
    assert (got[0] == 0).all() and not torch.signbit(got[0]).any()  # +0, where IEEE e5m2 gives -0
    assert torch.signbit(emulated_matmul(a, b, "fp8_e4m3fnuz", "fp64", "fp8_e5m2", 8, backend="torch")[0]).all()

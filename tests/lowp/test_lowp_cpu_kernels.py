"""The numba CPU backend of quantize: bit for bit the torch reference (every format, mode, container), same
random bits for stochastic rounding, shape/dtype handling, and the "auto" dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.lowp import FORMATS, FloatFormat, quantize, quantize_torch
from common.lowp.formats import container_format
from common.lowp.quantize import auto_backend, numba_enabled
from common.lowp.reference import round_general
from tests.lowp.lowp_oracle import edge_values, round_exact

pytest.importorskip("numba")
from common.lowp.cpu_kernels import quantize_numba  # noqa: E402

MODES = ["rne", "rz", "ru", "rd", "stochastic"]
CUSTOM = [FloatFormat("e3m3", 3, 3), FloatFormat("e5m4_nosub", 5, 4, subnormals=False),
          FloatFormat("e4m2_b4_sat", 4, 2, bias=4, overflow="saturate"), FloatFormat("e6m5", 6, 5),
          FloatFormat("e4m3_b12_nan", 4, 3, bias=12, specials="fn", overflow="nan"),
          FloatFormat("e3m2_bneg", 3, 2, bias=-2, specials="none", overflow="saturate"),  # q = 2 > 1
          FloatFormat("bf16_nosub", 8, 7, subnormals=False), FloatFormat("bf16_sat", 8, 7, overflow="saturate"),
          FloatFormat("e6m23", 6, 23), FloatFormat("fp32_nosub", 8, 23, subnormals=False),
          FloatFormat("fp32_sat", 8, 23, overflow="saturate"), FloatFormat("e11m40", 11, 40),
          FloatFormat("fp64_nosub", 11, 52, subnormals=False), FloatFormat("fp64_nan", 11, 52, overflow="nan"),
          FloatFormat("e10m30_sat", 10, 30, overflow="saturate")]
ALL_FORMATS = list(FORMATS.values()) + CUSTOM
# NaNs with payloads and either sign (kept as they are), -0, subnormal/normal container boundaries.
SPECIAL_BITS = {np.float32: [0x7FC00001, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x80000000, 0x00000001,
                             0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF],
                np.float64: [0x7FF8000000000001, 0xFFF8000000000000, 0x7FF0000000000001, 0x8000000000000000,
                             0x0000000000000001, 0x000FFFFFFFFFFFFF, 0x0010000000000000, 0x7FEFFFFFFFFFFFFF]}


def inputs(fmt: FloatFormat, dtype, seed: int = 0) -> np.ndarray:
    """The oracle tests' edge set (grid points, ties and their neighbours, largest subnormal/normal,
    overflow, ±0, ±inf, NaN), values below the smallest positive number, random values over the container's
    whole exponent range, and raw special bit patterns."""
    rng = np.random.default_rng(seed)
    bits = 24 if dtype == np.float32 else 53
    q = fmt.min_subnormal
    lo, hi = (-48, 40) if dtype == np.float32 else (-330, 310)
    with np.errstate(over="ignore", under="ignore"):
        parts = [np.array(edge_values(fmt, rng, dtype_bits=bits), dtype=np.float64).astype(dtype),
                 (rng.uniform(-1, 1, 400) * q).astype(dtype),
                 (rng.standard_normal(3000) * 10.0 ** rng.uniform(lo, hi, 3000)).astype(dtype),
                 np.array(SPECIAL_BITS[dtype], dtype=np.uint32 if dtype == np.float32 else np.uint64).view(dtype)]
    return np.concatenate(parts)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """Identical bit patterns (NaN payloads and signs included), dtype and shape."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape)
    it = torch.int64 if got.dtype == torch.float64 else torch.int32 if got.dtype == torch.float32 else torch.int16
    g, w = got.reshape(-1).view(it), want.reshape(-1).view(it)
    bad = (g != w).nonzero().flatten()[:6]
    assert bad.numel() == 0, (f"{what}: {int((g != w).sum())} mismatches; x={x.reshape(-1)[bad].tolist()} "
                              f"got={got.reshape(-1)[bad].tolist()} want={want.reshape(-1)[bad].tolist()}")


def fits(fmt: FloatFormat, dtype) -> bool:
    return dtype == np.float64 or fmt.fits_in(FORMATS["fp32"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_numba_matches_torch_bit_for_bit(fmt, dtype):
    if not fits(fmt, dtype):
        pytest.skip("format not representable in float32")
    x = torch.from_numpy(inputs(fmt, dtype))
    for mode in MODES:
        want = quantize_torch(x, fmt, mode, generator=torch.Generator().manual_seed(11))
        got = quantize_numba(x, fmt, mode, generator=torch.Generator().manual_seed(11))
        if fmt.min_subnormal > 1 and mode != "stochastic":
            # q > 1: the reference's fixed-point path scales by 1/q < 1, which flushes container subnormals
            # (it must still give RU(2^-149) = q): check both against the exact oracle there
            assert_bits_equal(want, round_general(x, fmt, mode, None), x, f"{fmt} {mode} fixed vs general")
            tiny = x.abs() < fmt.min_normal
            oracle = [round_exact(float(v), fmt, mode) for v in x[tiny]]
            assert_bits_equal(got[tiny], torch.tensor(oracle, dtype=x.dtype), x[tiny], f"{fmt} {mode} vs oracle")
        assert_bits_equal(got, want, x, f"{fmt} {mode} {x.dtype}")


def test_shapes_dtypes_and_non_contiguous():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=g) * 10.0 ** torch.randint(-6, 6, (40, 30), generator=g)
    cases = [base.t(), base[::3, 1::2], base.double().t(), base.to(torch.bfloat16).t(), base.half(),
             torch.tensor(1.3), torch.empty(0, 4), base.reshape(2, 3, 4, 50)]
    for x in cases:
        for fmt in ("fp8_e4m3fn", "bf16", "fp4_e2m1"):
            if not FORMATS[fmt].fits_in(container_format(x.dtype)):
                with pytest.raises(ValueError, match="not representable"):
                    quantize(x, fmt, backend="numba")
                continue
            for mode in MODES:
                want = quantize_torch(x, FORMATS[fmt], mode, torch.Generator().manual_seed(1))
                got = quantize(x, fmt, mode, generator=torch.Generator().manual_seed(1), backend="numba")
                assert_bits_equal(got, want, x, f"{fmt} {mode} {x.dtype} {tuple(x.shape)}")
    y = quantize(base, "fp32", backend="numba")  # nothing to do: a copy, as the torch path returns
    assert torch.equal(y, base) and y.data_ptr() != base.data_ptr()


def test_large_input_split_across_threads():
    """Above the threading threshold the kernels run on chunks; results (and random-bit use) are unchanged."""
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(4)) * 1e-2
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        for fmt in ("bf16", "fp8_e5m2"):
            for mode in ("rne", "stochastic"):
                want = quantize_torch(x, FORMATS[fmt], mode, torch.Generator().manual_seed(2))
                got = quantize_numba(x, FORMATS[fmt], mode, torch.Generator().manual_seed(2))
                assert_bits_equal(got, want, x, f"{fmt} {mode} threaded")
    finally:
        torch.set_num_threads(old)


def test_auto_dispatch(monkeypatch):
    x = torch.randn(100)
    monkeypatch.delenv("LLM4ALL_NO_NUMBA", raising=False)
    assert numba_enabled() and auto_backend(x) == "numba"
    assert torch.equal(quantize(x, "fp8_e5m2", "stochastic", seed=5),
                       quantize_torch(x, FORMATS["fp8_e5m2"], "stochastic", torch.Generator().manual_seed(5)))
    assert auto_backend(x.requires_grad_()) == "torch"  # the native bf16/fp16 cast keeps autograd working
    with torch.no_grad():
        assert auto_backend(x) == "numba"
    monkeypatch.setenv("LLM4ALL_NO_NUMBA", "1")
    assert not numba_enabled() and auto_backend(x.detach()) == "torch"
    with pytest.raises(ValueError, match="backend must be"):
        quantize(x, "bf16", backend="cuda")

"""Rounding to a FloatFormat: the PyTorch reference (integer operations on the bit pattern).

The value is rounded in its own container (float32 bits as int32, float64 bits as int64; float16/bfloat16
are widened to float32 exactly), so float64 inputs are rounded once, directly, never via float32.
For ``|x| >= min_subnormal`` the magnitude bits are an integer whose low ``r`` bits fall below the
target ulp, with ``r = Mc - m`` in the normal range and one more per binade below ``emin``
(gradual underflow). Dropping them with an increment first is the CPFloat recipe:

* RNE: add ``2^(r-1) - 1 + lsb`` then clear the low bits (the carry walks into the exponent by itself),
* RZ: clear; RU/RD: add ``2^r - 1`` when rounding away from zero, then clear,
* stochastic: add a uniform random integer in ``[0, 2^r)``, then clear (P(up) = distance / ulp).

Magnitudes below the smallest positive number ``q`` (``min_subnormal``, or ``min_normal`` with subnormals
off) go to 0 or ``q`` by comparison (RNE: ties to 0, the even one). Overflow follows ``fmt.overflow``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

from common.lowp.formats import FORMATS, FloatFormat, container_format, get_format

MODES = ("rne", "rz", "ru", "rd", "stochastic")
_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"rounding mode must be one of {MODES}, got {mode!r}")
    return mode


def _bits_of(value: float, dtype: torch.dtype) -> int:
    return int(torch.tensor(value, dtype=dtype).view(_INT[dtype]).item())


def format_constants(fmt: FloatFormat, dtype: torch.dtype) -> dict:
    """Integer constants for rounding ``fmt`` inside container ``dtype`` (float32 or float64)."""
    cf = container_format(dtype)
    q = fmt.min_subnormal
    return {
        "MC": cf.man_bits, "R0": cf.man_bits - fmt.man_bits, "EMIN_FIELD": fmt.emin + cf.exponent_bias,
        "MAX_BITS": _bits_of(fmt.max_normal, dtype), "INF_BITS": _bits_of(float("inf"), dtype),
        "Q_BITS": _bits_of(q, dtype), "HALF_Q_BITS": _bits_of(q / 2, dtype), "Q": q,
        "MIN_NORMAL_BITS": _bits_of(fmt.min_normal, dtype),
    }


def needs_work(fmt: FloatFormat, dtype: torch.dtype) -> bool:
    """False when rounding ``dtype`` values to ``fmt`` is the identity (fmt contains the container)."""
    cf = container_format(dtype)
    return not (cf.fits_in(fmt) and fmt.subnormals and fmt.specials == "ieee" and fmt.overflow == "inf")


def resolve_container(x: torch.Tensor, fmt: FloatFormat) -> torch.dtype:
    """The dtype the rounding is computed in; raises if ``fmt`` is not representable in ``x.dtype``."""
    if not x.is_floating_point():
        raise TypeError(f"quantize needs a floating-point tensor, got {x.dtype}")
    cf = container_format(x.dtype)
    if not fmt.fits_in(cf):
        raise ValueError(f"format {fmt} is not representable in {x.dtype} (precision or range too large); "
                         f"pass a float64 tensor")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def random_bits(shape: torch.Size, dtype: torch.dtype, device: torch.device,
                generator: torch.Generator | None) -> torch.Tensor:
    """Uniform integers in [0, 2^Mc) for stochastic rounding (Mc = container mantissa bits)."""
    mc = container_format(dtype).man_bits
    return torch.randint(0, 2**mc, shape, generator=generator, dtype=_INT[dtype], device=device)


def _round_general(x: torch.Tensor, fmt: FloatFormat, mode: str, rnd: torch.Tensor | None) -> torch.Tensor:
    """Round a float32/float64 tensor to ``fmt`` (any value: subnormal, tiny, overflow, inf, NaN)."""
    it = _INT[x.dtype]
    c = format_constants(fmt, x.dtype)
    sign_bit = torch.iinfo(it).min
    bits = x.view(it)
    sign = bits & sign_bit
    neg = sign != 0
    finite = torch.isfinite(x)
    a = torch.where(finite, bits & ~sign_bit, 0)                     # magnitude bits (0 for inf/NaN)

    # Bits to drop: r0 in the normal range, +1 per binade below emin (container subnormals: field 1).
    field = (a >> c["MC"]).clamp_min(1)
    r = ((c["EMIN_FIELD"] - field).clamp_min(0) + c["R0"]).clamp_max(c["MC"])
    mask = (torch.ones_like(a) << r) - 1
    if mode == "rne":
        # The kept last bit; at r == Mc (the smallest binade) it is the implicit bit, not an exponent bit.
        sig = (a & ((1 << c["MC"]) - 1)) | ((a >> c["MC"]) > 0).to(it) << c["MC"]
        inc = (mask >> 1) + ((sig >> r) & (r > 0).to(it))
    elif mode == "rz":
        inc = torch.zeros_like(a)
    elif mode == "ru":
        inc = torch.where(neg, 0, mask)
    elif mode == "rd":
        inc = torch.where(neg, mask, 0)
    else:
        inc = rnd & mask
    mag = (a + inc) & ~mask

    # Below the smallest positive number q: 0 or q.
    tiny = a < c["Q_BITS"]
    if mode == "rne":
        up = a > c["HALF_Q_BITS"]
    elif mode == "rz":
        up = torch.zeros_like(tiny)
    elif mode == "ru":
        up = (a > 0) & ~neg
    elif mode == "rd":
        up = (a > 0) & neg
    else:
        mc = container_format(x.dtype).man_bits
        u = rnd.to(x.dtype) * 2.0**-mc
        up = u < x.abs() / c["Q"]
    mag = torch.where(tiny, up.to(it) * c["Q_BITS"], mag)

    # Overflow of finite values, then inf inputs, per the format's policy.
    if mode == "rd":
        toward_zero = ~neg
    elif mode == "ru":
        toward_zero = neg
    elif mode == "rz":
        toward_zero = torch.ones_like(neg)
    else:
        toward_zero = torch.zeros_like(neg)
    over = mag > c["MAX_BITS"]
    make_nan = torch.zeros_like(neg)
    if fmt.overflow == "inf":
        over_mag = torch.where(toward_zero, c["MAX_BITS"], c["INF_BITS"])
        inf_mag = c["INF_BITS"]
    elif fmt.overflow == "saturate":
        over_mag = torch.full_like(mag, c["MAX_BITS"])
        inf_mag = c["MAX_BITS"]
    else:  # "nan"
        over_mag = torch.full_like(mag, c["MAX_BITS"])
        make_nan = (over & ~toward_zero) | torch.isinf(x)
        inf_mag = c["INF_BITS"]
    mag = torch.where(over, over_mag, mag)
    mag = torch.where(torch.isinf(x), inf_mag, mag)
    out = (mag.to(it) | sign).view(x.dtype)
    out = torch.where(make_nan, float("nan"), out)
    return torch.where(torch.isnan(x), x, out)


def _round_normal(bits: torch.Tensor, r0: int, mode: str, rnd: torch.Tensor | None) -> torch.Tensor:
    """Fast path for values whose result is a normal number: a constant ``r0`` bits to drop, computed on
    the signed bit pattern (the sign bit is above every carry), a handful of in-place integer passes."""
    if r0 == 0:  # full container precision: normal results are exact
        return bits.clone()
    mask = (1 << r0) - 1
    if mode == "rne":
        inc = (bits >> r0).bitwise_and_(1).add_(mask >> 1)
    elif mode == "rz":
        return bits & ~mask
    elif mode in ("ru", "rd"):
        neg_ones = bits >> (bits.element_size() * 8 - 1)  # -1 where negative, 0 elsewhere
        inc = (neg_ones if mode == "rd" else neg_ones.bitwise_not_()).bitwise_and_(mask)
    else:
        inc = rnd & mask
    return inc.add_(bits).bitwise_and_(~mask)


def _same_range_ieee(fmt: FloatFormat, dtype: torch.dtype) -> bool:
    cf = container_format(dtype)
    return (fmt.emin == cf.emin and fmt.emax == cf.emax and fmt.subnormals and fmt.specials == "ieee"
            and fmt.overflow == "inf")


def _native_cast_dtype(fmt: FloatFormat, x: torch.Tensor, mode: str) -> torch.dtype | None:
    """torch's own float32 -> bf16/fp16 cast is IEEE RNE with gradual underflow and overflow to inf: the
    same function as our rounding for exactly these formats (checked bit for bit in the tests)."""
    if mode != "rne" or x.dtype != torch.float32:
        return None
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if fmt == FORMATS[name] or (fmt.exp_bits, fmt.man_bits, fmt.exponent_bias, fmt.subnormals,
                                    fmt.specials, fmt.overflow) == (FORMATS[name].exp_bits,
                                    FORMATS[name].man_bits, FORMATS[name].exponent_bias, True, "ieee", "inf"):
            return dt
    return None


def _round_container(x: torch.Tensor, fmt: FloatFormat, mode: str, generator: torch.Generator | None):
    """Round a contiguous float32/float64 tensor: the fast path for every element whose magnitude lies in
    [min_normal, max_normal] (or is 0), the general routine for the few others."""
    it = _INT[x.dtype]
    c = format_constants(fmt, x.dtype)
    rnd = random_bits(x.shape, x.dtype, x.device, generator) if mode == "stochastic" else None
    bits = x.view(it)
    y = _round_normal(bits, c["R0"], mode, rnd)
    if _same_range_ieee(fmt, x.dtype) and mode != "stochastic":  # (SR: same random-bit use as Triton)
        # Container subnormals, overflow to inf and inf itself come out right from the fast path (the
        # carry runs into the all-ones exponent); only NaN payloads could be truncated to inf.
        nan = torch.isnan(x)
        if nan.any():
            y[nan] = bits[nan]
        return y.view(x.dtype)
    a = bits & torch.iinfo(it).max
    if mode != "stochastic":
        sub = a < c["MIN_NORMAL_BITS"]
        n_sub = int(sub.sum())
        if n_sub > x.numel() // 16:  # many (fp4/fp6 data): whole-tensor passes beat a gather
            y = torch.where(sub, _round_fixed_point(x, fmt, mode).view(it), y)
        elif n_sub:
            idx = sub.nonzero(as_tuple=True)
            y[idx] = _round_fixed_point(x[idx], fmt, mode).view(it)
        slow = a > c["MAX_BITS"]
    else:
        slow = (a > c["MAX_BITS"]).logical_or_((a < c["MIN_NORMAL_BITS"]).logical_and_(a != 0))
    if slow.any():
        idx = slow.nonzero(as_tuple=True)
        y[idx] = _round_general(x[idx], fmt, mode, None if rnd is None else rnd[idx]).view(it)
    return y.view(x.dtype)


_ROUND_INT = {"rne": torch.round, "rz": torch.trunc, "ru": torch.ceil, "rd": torch.floor}


def _round_fixed_point(x: torch.Tensor, fmt: FloatFormat, mode: str) -> torch.Tensor:
    """Rounding below min_normal, where the grid is fixed-point with spacing q = min_subnormal (or
    min_normal without subnormals): scale by 1/q (two exact power-of-two steps, 1/q may exceed the
    container's range), round to an integer in ``mode`` (torch.round is half-to-even), scale back (exact:
    k*q is representable). Valid only for |x| < min_normal."""
    q = fmt.min_subnormal
    e = -math.frexp(q)[1] + 1  # 1/q = 2^e
    scaled = (x * 2.0 ** (e // 2)) * 2.0 ** (e - e // 2)
    k = _ROUND_INT[mode](scaled)
    if e < 0 and mode in ("ru", "rd"):
        # q > 1 (negative bias): scaling down can flush a tiny nonzero x to 0, yet directed rounding must
        # still step away from zero to ±q on its side
        lost = (scaled == 0) & (x != 0)
        away = (x > 0) if mode == "ru" else (x < 0)
        k = torch.where(lost & away, torch.sign(x), k)
    return k * q


def quantize_torch(x: torch.Tensor, fmt: FloatFormat, mode: str = "rne",
                   generator: torch.Generator | None = None, native_cast: bool = False) -> torch.Tensor:
    """PyTorch reference of :func:`quantize` (any device). ``native_cast``: use torch's float32 -> bf16/fp16
    cast where it is the identical function (RNE to exactly those formats), else the integer path."""
    _check_mode(mode)
    if not needs_work(fmt, x.dtype):
        return x.clone()
    if native_cast and (dt := _native_cast_dtype(fmt, x, mode)) is not None:
        return x.to(dt).to(x.dtype)
    work = resolve_container(x, fmt)
    y = _round_container(x.to(work).contiguous(), fmt, mode, generator)
    return y.to(x.dtype)  # exact: fmt fits in x.dtype


def numba_enabled() -> bool:
    """numba is installed and not switched off with ``LLM4ALL_NO_NUMBA=1`` (read on every call)."""
    return os.environ.get("LLM4ALL_NO_NUMBA", "0") != "1" and _numba_installed()


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def auto_backend(x: torch.Tensor) -> str:
    """The backend ``quantize(..., backend="auto")`` uses for ``x``: Triton on CUDA; numba on CPU when enabled,
    except under autograd (the torch path's bf16/fp16 native cast keeps a gradient); else torch. (RNE to
    fp16 from float32 then still takes torch's native cast, the faster of the two.)"""
    if x.is_cuda:
        return "triton"
    if x.device.type == "cpu" and numba_enabled() and not (x.requires_grad and torch.is_grad_enabled()):
        return "numba"
    return "torch"


def quantize(x: torch.Tensor, fmt: FloatFormat | str | tuple[int, int], mode: str = "rne",
             generator: torch.Generator | None = None, seed: int | None = None,
             backend: str = "auto") -> torch.Tensor:
    """Round every element of ``x`` to ``fmt`` with ``mode``; returns a tensor of x's dtype and shape.

    ``mode``: "rne" (nearest, ties to even), "rz" (toward zero), "ru" (toward +inf), "rd" (toward -inf),
    "stochastic" (up with probability distance/ulp; randomness from ``generator``, or a fresh generator
    seeded with ``seed``, else torch's global RNG). ``backend``: "torch", "numba" (CPU), "triton" or "auto"
    (see :func:`auto_backend`: Triton on CUDA tensors, numba on CPU tensors when installed and not disabled
    by ``LLM4ALL_NO_NUMBA=1``, else the torch integer path; torch's own bf16/fp16 cast where it is the
    identical function and faster). All backends give bit-identical results, stochastic rounding included (same random
    bits from the same generator). The format must be representable in ``x.dtype`` (float64 inputs accept
    any format up to fp64; float32 inputs any format with e <= 8, m <= 23 and IEEE-sized range).
    """
    fmt = get_format(fmt)
    _check_mode(mode)
    if mode == "stochastic" and generator is None and seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
    if backend == "auto":
        backend = auto_backend(x)
        # torch's float32 -> fp16 cast (F16C hardware) is the identical function and beats the numba kernel.
        if backend == "torch" or (backend == "numba" and _native_cast_dtype(fmt, x, mode) == torch.float16):
            return quantize_torch(x, fmt, mode, generator, native_cast=True)
    if backend == "torch":
        return quantize_torch(x, fmt, mode, generator)
    if backend == "numba":
        from common.lowp.cpu_kernels import quantize_numba

        return quantize_numba(x, fmt, mode, generator)
    if backend == "triton":
        from common.lowp.triton_kernels import quantize_triton

        return quantize_triton(x, fmt, mode, generator)
    raise ValueError(f"backend must be 'auto', 'torch', 'numba' or 'triton', got {backend!r}")

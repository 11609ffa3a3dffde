"""Numba CPU backend of ``quantize``: the reference's rounding (``reference.round_general``) as one pass per
element over the container's bit pattern (int32 for float32, int64 for float64), bit-identical to
``quantize_torch`` in every mode, format and container; stochastic rounding consumes the same random
integers (drawn by ``spec.random_bits`` from the caller's generator) in the same order.

The per-element routine is branch-light (selects, no early exits) so LLVM vectorises the loop; the mode is a
compile-time constant of each loop (one loop per mode, the routine is inlined) and everything else is a
loop-invariant argument. Formats with the container's own range (bf16, tf32 from float32) take a five-op
kernel instead (the reference's same-range shortcut). ``quantize`` uses this backend for CPU tensors
unless ``LLM4ALL_NO_NUMBA=1``.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from common.lowp.formats import FloatFormat
from common.lowp.spec import (
    INT_VIEW,
    MODE_CODES,
    OVERFLOW_CODES,
    check_mode,
    format_constants,
    needs_work,
    random_bits,
    resolve_container,
    same_range_ieee,
)

try:
    import numba
except ImportError:  # optional dependency: quantize falls back to the torch path
    numba = None

# Canonical quiet NaN, as torch.where(..., float("nan"), ...) writes it in the reference.
_NAN_BITS = {torch.float32: 0x7FC00000, torch.float64: 0x7FF8000000000000}
_PARALLEL_MIN = 1 << 20  # below this, thread start-up costs more than it saves
_pool: ThreadPoolExecutor | None = None


def _njit(**kw):
    if numba is None:
        return lambda fn: fn
    return numba.njit(**kw)


@_njit(inline="always")
def _round_one(b, xf, rb, mode, ovf, abs_mask, mc, r0, emin_field, max_bits, inf_bits, q_bits, half_q_bits,
               s1, s2, u_scale, nan_bits, no_neg_zero, unsigned):
    """One element (see reference.round_general, which this mirrors step by step). ``no_neg_zero``: fnuz
    formats (a zero result is +0); ``unsigned``: e8m0 (no zero: below q gives q; x <= 0 gives NaN)."""
    a = b & abs_mask
    neg = b < 0
    nonpos = neg | (a == 0)  # x <= 0, before inf/NaN magnitudes are zeroed
    sign = b ^ a  # the sign bit, sign-extended like b (the store truncates to the container width)
    is_nan = a > inf_bits
    is_inf = a == inf_bits
    if a >= inf_bits:
        a = 0 * a  # inf/NaN: magnitude 0 in the arithmetic below (as the reference), fixed up at the end

    # Bits to drop: r0 in the normal range, one more per binade below emin (container subnormals: field 1).
    field = max(a >> mc, 1)
    r = min(max(emin_field - field, 0) + r0, mc)
    mask = (1 << r) - 1
    if mode == 0:
        sig = (a & ((1 << mc) - 1)) | (int(a >> mc > 0) << mc)
        inc = (mask >> 1) + ((sig >> r) & int(r > 0))
    elif mode == 1:
        inc = 0 * mask
    elif mode == 2:
        inc = 0 if neg else mask
    elif mode == 3:
        inc = mask if neg else 0
    else:
        inc = rb & mask
    mag = (a + inc) & ~mask

    # Below the smallest positive number q: 0 or q.
    if mode == 0:
        up = a > half_q_bits
    elif mode == 1:
        up = False
    elif mode == 2:
        up = a > 0 and not neg
    elif mode == 3:
        up = a > 0 and neg
    else:
        up = rb * u_scale < (abs(xf) * s1) * s2  # = |x| / q exactly (see _scale_by_inv_q)
    if unsigned:
        up = True
    if a < q_bits:
        mag = q_bits if up else 0 * mag

    toward_zero = (mode == 1) or (mode == 2 and neg) or (mode == 3 and not neg)
    make_nan = False
    if mag > max_bits:
        if ovf == 0:
            mag = max_bits if toward_zero else inf_bits
        else:
            mag = max_bits
            make_nan = ovf == 2 and not toward_zero
    if is_inf:
        mag = max_bits if ovf == 1 else inf_bits
        make_nan = ovf == 2
    if no_neg_zero and mag == 0:
        sign = 0 * sign
    if unsigned and nonpos:
        make_nan = True
    out = mag | sign
    if make_nan:
        out = nan_bits
    if is_nan:
        out = b
    return out


@_njit(cache=True, nogil=True, error_model="numpy")
def _round_kernel(bits, xf, rnd, out, mode, ovf, abs_mask, mc, r0, emin_field, max_bits, inf_bits, q_bits,
                  half_q_bits, s1, s2, u_scale, nan_bits, no_neg_zero, unsigned):
    # One loop per mode so that the inlined routine sees the mode as a constant (no per-element dispatch);
    # the routine has no early exits, so LLVM if-converts and vectorises each loop.
    n = bits.shape[0]
    if mode == 0:
        for i in range(n):
            out[i] = _round_one(bits[i], 0.0, 0, 0, ovf, abs_mask, mc, r0, emin_field, max_bits, inf_bits,
                                q_bits, half_q_bits, s1, s2, u_scale, nan_bits, no_neg_zero, unsigned)
    elif mode == 1:
        for i in range(n):
            out[i] = _round_one(bits[i], 0.0, 0, 1, ovf, abs_mask, mc, r0, emin_field, max_bits, inf_bits,
                                q_bits, half_q_bits, s1, s2, u_scale, nan_bits, no_neg_zero, unsigned)
    elif mode == 2:
        for i in range(n):
            out[i] = _round_one(bits[i], 0.0, 0, 2, ovf, abs_mask, mc, r0, emin_field, max_bits, inf_bits,
                                q_bits, half_q_bits, s1, s2, u_scale, nan_bits, no_neg_zero, unsigned)
    elif mode == 3:
        for i in range(n):
            out[i] = _round_one(bits[i], 0.0, 0, 3, ovf, abs_mask, mc, r0, emin_field, max_bits, inf_bits,
                                q_bits, half_q_bits, s1, s2, u_scale, nan_bits, no_neg_zero, unsigned)
    else:
        for i in range(n):
            out[i] = _round_one(bits[i], xf[i], rnd[i], 4, ovf, abs_mask, mc, r0, emin_field, max_bits,
                                inf_bits, q_bits, half_q_bits, s1, s2, u_scale, nan_bits, no_neg_zero, unsigned)


@_njit(inline="always")
def _round_same_range_one(b, mode, abs_mask, r0, inf_bits):
    """One element when fmt has the container's exponent range, subnormals and IEEE overflow (bf16, tf32 from
    float32), deterministic modes, r0 >= 1: a constant r0 bits to drop on the signed pattern (the carry walks
    into the exponent, up to inf, never into the sign); only NaN payloads need keeping."""
    mask = (1 << r0) - 1
    if mode == 0:
        inc = ((b >> r0) & 1) + (mask >> 1)
    elif mode == 1:
        inc = 0 * mask
    elif mode == 2:
        inc = 0 if b < 0 else mask
    else:
        inc = mask if b < 0 else 0
    out = (b + inc) & ~mask
    if (b & abs_mask) > inf_bits:
        out = b
    return out


@_njit(cache=True, nogil=True, error_model="numpy")
def _round_same_range_kernel(bits, out, mode, abs_mask, r0, inf_bits):
    n = bits.shape[0]
    if mode == 0:
        for i in range(n):
            out[i] = _round_same_range_one(bits[i], 0, abs_mask, r0, inf_bits)
    elif mode == 1:
        for i in range(n):
            out[i] = _round_same_range_one(bits[i], 1, abs_mask, r0, inf_bits)
    elif mode == 2:
        for i in range(n):
            out[i] = _round_same_range_one(bits[i], 2, abs_mask, r0, inf_bits)
    else:
        for i in range(n):
            out[i] = _round_same_range_one(bits[i], 3, abs_mask, r0, inf_bits)


def _scale_by_inv_q(q: float) -> tuple[float, float]:
    """Factors with (|x| * s1) * s2 == |x| / q in the container's arithmetic (the reference divides): q is a
    power of two, so for q <= 1 two exact upward power-of-two steps (1/q alone may overflow: bf16's q is
    2^-133); for q > 1 the single factor 1/q (a power of two >= 2^-128, the same correctly rounded result).
    Multiplying avoids dividing by q, which is a subnormal for bf16 and costs a microcode assist per lane."""
    k = -math.frexp(q)[1] + 1  # q = 2^-k
    if k < 0:
        return 1.0 / q, 1.0
    return 2.0 ** (k // 2), 2.0 ** (k - k // 2)


@functools.cache  # the constants cost a few torch calls: too much for the many small tensors of a trace
def _kernel_args(fmt: FloatFormat, dtype: torch.dtype, mode: str) -> tuple:
    c = format_constants(fmt, dtype)
    fdt = np.float32 if dtype == torch.float32 else np.float64
    s1, s2 = _scale_by_inv_q(c["Q"])
    return (MODE_CODES[mode], OVERFLOW_CODES[fmt.overflow], int(torch.iinfo(INT_VIEW[dtype]).max), c["MC"], c["R0"],
            c["EMIN_FIELD"], c["MAX_BITS"], c["INF_BITS"], c["Q_BITS"], c["HALF_Q_BITS"], fdt(s1), fdt(s2),
            fdt(2.0 ** -c["MC"]), _NAN_BITS[dtype], not fmt.has_negative_zero, not fmt.signed)


def _chunks(n: int) -> list[slice]:
    """Equal slices, one per torch thread for large inputs (the kernels are elementwise and release the GIL)."""
    threads = torch.get_num_threads()
    if n < _PARALLEL_MIN or threads <= 1:
        return [slice(0, n)]
    step = -(-n // threads)
    return [slice(s, s + step) for s in range(0, n, step)]


def _launch(kernel, arrays: tuple[np.ndarray, ...], args: tuple) -> None:
    """``kernel(*arrays, *args)``, the arrays (all of one length) split across threads when large."""
    parts = _chunks(arrays[0].shape[0])
    if len(parts) == 1:
        kernel(*arrays, *args)
        return
    global _pool
    if _pool is None or _pool._max_workers < len(parts):
        _pool = ThreadPoolExecutor(max_workers=len(parts))
    for f in [_pool.submit(kernel, *(a[p] for a in arrays), *args) for p in parts]:
        f.result()


def round_container_numba(x: torch.Tensor, fmt: FloatFormat, mode: str, rnd: torch.Tensor | None) -> torch.Tensor:
    """Round a contiguous float32/float64 CPU tensor to ``fmt`` (``rnd``: random_bits for stochastic)."""
    it = INT_VIEW[x.dtype]
    flat = x.detach().reshape(-1)
    bits = flat.view(it).numpy()
    out = np.empty_like(bits)
    args = _kernel_args(fmt, x.dtype, mode)
    if same_range_ieee(fmt, x.dtype) and mode != "stochastic" and args[4] > 0:
        _launch(_round_same_range_kernel, (bits, out), (args[0], args[2], args[4], args[7]))
    else:
        xf = flat.numpy()
        # Deterministic modes read no random bits: a full-length dummy keeps one signature and lets it split.
        r = rnd.reshape(-1).numpy() if rnd is not None else bits
        _launch(_round_kernel, (bits, xf, r, out), args)
    return torch.from_numpy(out).view(x.dtype).view(x.shape)


def quantize_numba(x: torch.Tensor, fmt: FloatFormat, mode: str = "rne",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The numba backend of :func:`quantize` (CPU tensors): same results as ``quantize_torch``, bit for bit."""
    check_mode(mode)
    if numba is None:
        raise RuntimeError("backend='numba' needs the numba package")
    if x.device.type != "cpu":
        raise ValueError(f"backend='numba' runs on CPU tensors, got device {x.device}")
    if not needs_work(fmt, x.dtype):
        return x.clone()
    work = resolve_container(x, fmt)
    xc = x.to(work).contiguous()
    rnd = random_bits(xc.shape, work, xc.device, generator) if mode == "stochastic" else None
    return round_container_numba(xc, fmt, mode, rnd).to(x.dtype)

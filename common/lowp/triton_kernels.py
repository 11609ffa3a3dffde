"""Triton kernels for format emulation: ``quantize`` and the emulated-accumulation matmul.

Same algorithm as the PyTorch reference (``reference.py``) on float32/float64 bit patterns
(int32/int64), so they also run under the Triton interpreter on CPU (``TRITON_INTERPRET=1``, which must be
set before this module is first imported; the interpreter has no bf16 arithmetic, hence bit patterns).
``quantize_triton`` takes its stochastic-rounding bits from the same torch generator call as the
reference, so both backends give identical results for the same generator state. The matmul kernel's
stochastic mode draws Philox numbers (``tl.randint4x``) seeded from the generator instead: statistically
equivalent to the reference, not bit-identical.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from common.lowp.formats import FloatFormat
from common.lowp.spec import (
    MODE_CODES,
    OVERFLOW_CODES,
    check_matmul_args,
    check_mode,
    format_constants,
    needs_work,
    output_dtype,
    random_bits,
    resolve_container,
)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not interpreter_enabled():
        raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before importing "
                           "common.lowp.triton_kernels (CPU interpreter, slow: for tests). Use backend='torch'.")


def round_constants(fmt: FloatFormat, dtype: torch.dtype, mode: str) -> dict:
    if not (fmt.has_negative_zero and fmt.signed):
        # _round keeps the sign of zero and has zero: fnuz/e8m0 results would be silently wrong.
        raise ValueError(f"the Triton kernels do not model format {fmt} (no -0 or unsigned); use the torch "
                         f"backend")
    c = format_constants(fmt, dtype)
    return {"MC": c["MC"], "R0": c["R0"], "EMIN_FIELD": c["EMIN_FIELD"], "MAX_BITS": c["MAX_BITS"],
            "INF_BITS": c["INF_BITS"], "Q_BITS": c["Q_BITS"], "HALF_Q_BITS": c["HALF_Q_BITS"], "Q": c["Q"],
            "RSCALE": 2.0 ** -c["MC"], "MODE": MODE_CODES[mode], "OVERFLOW": OVERFLOW_CODES[fmt.overflow]}


@triton.jit
def _round(x, rnd, MC: tl.constexpr, R0: tl.constexpr, EMIN_FIELD: tl.constexpr, MAX_BITS: tl.constexpr,
           INF_BITS: tl.constexpr, Q_BITS: tl.constexpr, HALF_Q_BITS: tl.constexpr, Q: tl.constexpr,
           RSCALE: tl.constexpr, MODE: tl.constexpr, OVERFLOW: tl.constexpr, IS64: tl.constexpr):
    """Round float32 (IS64=False) or float64 values ``x`` to the format described by the constants.
    ``rnd``: uniform integers in [0, 2^MC) (used by MODE 4 = stochastic only)."""
    if IS64:
        bits = x.to(tl.int64, bitcast=True)
        abs_mask = 0x7FFFFFFFFFFFFFFF
    else:
        bits = x.to(tl.int32, bitcast=True)
        abs_mask = 0x7FFFFFFF
    neg = bits < 0
    sign = bits & ~abs_mask
    a0 = bits & abs_mask
    is_nan = a0 > INF_BITS
    is_inf = a0 == INF_BITS
    a = tl.where(a0 < INF_BITS, a0, 0)
    field0 = a >> MC
    field = tl.maximum(field0, 1)
    r = tl.minimum(tl.maximum(EMIN_FIELD - field, 0) + R0, MC)
    one = tl.full(a.shape, 1, a.dtype)
    mask = (one << r) - 1
    if MODE == 0:  # nearest, ties to even; the kept last bit is the implicit bit when r == MC
        sig = (a & ((one << MC) - 1)) | (tl.where(field0 > 0, one, 0) << MC)
        inc = (mask >> 1) + ((sig >> r) & tl.where(r > 0, one, 0))
    elif MODE == 1:
        inc = a * 0
    elif MODE == 2:
        inc = tl.where(neg, 0, mask)
    elif MODE == 3:
        inc = tl.where(neg, mask, 0)
    else:
        inc = rnd & mask
    mag = (a + inc) & ~mask

    tiny = a < Q_BITS
    if MODE == 0:
        up = a > HALF_Q_BITS
    elif MODE == 1:
        up = a < 0
    elif MODE == 2:
        up = (a > 0) & (~neg)
    elif MODE == 3:
        up = (a > 0) & neg
    else:
        u = rnd.to(x.dtype) * RSCALE
        up = u < tl.abs(x) / Q
    mag = tl.where(tiny, tl.where(up, Q_BITS, 0), mag)

    if MODE == 1:
        toward_zero = a >= 0
    elif MODE == 2:
        toward_zero = neg
    elif MODE == 3:
        toward_zero = ~neg
    else:
        toward_zero = a < 0
    over = mag > MAX_BITS
    make_nan = a < 0  # all False
    if OVERFLOW == 0:
        mag = tl.where(over, tl.where(toward_zero, MAX_BITS, INF_BITS), mag)
        mag = tl.where(is_inf, INF_BITS, mag)
    elif OVERFLOW == 1:
        mag = tl.where(over | is_inf, MAX_BITS, mag)
    else:
        mag = tl.where(over, MAX_BITS, mag)
        make_nan = (over & (~toward_zero)) | is_inf
    if IS64:
        y = (mag | sign).to(tl.float64, bitcast=True)
    else:
        y = (mag.to(tl.int32) | sign).to(tl.float32, bitcast=True)
    y = tl.where(make_nan, float("nan"), y)
    return tl.where(is_nan, x, y)


@triton.jit
def quantize_kernel(x_ptr, y_ptr, rnd_ptr, n, BLOCK: tl.constexpr, HAS_RND: tl.constexpr,
                     MC: tl.constexpr, R0: tl.constexpr, EMIN_FIELD: tl.constexpr, MAX_BITS: tl.constexpr,
                     INF_BITS: tl.constexpr, Q_BITS: tl.constexpr, HALF_Q_BITS: tl.constexpr, Q: tl.constexpr,
                     RSCALE: tl.constexpr, MODE: tl.constexpr, OVERFLOW: tl.constexpr, IS64: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(x_ptr + offs, mask=valid, other=0.0)
    if HAS_RND:
        rnd = tl.load(rnd_ptr + offs, mask=valid, other=0)
    else:
        if IS64:
            rnd = tl.zeros([BLOCK], tl.int64)
        else:
            rnd = tl.zeros([BLOCK], tl.int32)
    y = _round(x, rnd, MC, R0, EMIN_FIELD, MAX_BITS, INF_BITS, Q_BITS, HALF_Q_BITS, Q, RSCALE, MODE, OVERFLOW,
               IS64)
    tl.store(y_ptr + offs, y, mask=valid)


def quantize_triton(x: torch.Tensor, fmt: FloatFormat, mode: str = "rne",
                    generator: torch.Generator | None = None, block: int = 1024) -> torch.Tensor:
    """Triton version of :func:`common.lowp.reference.quantize_torch` (bit-identical, same generator use)."""
    check_mode(mode)
    if not needs_work(fmt, x.dtype):
        return x.clone()
    work = resolve_container(x, fmt)
    _check_device(x)
    xc = x.to(work).contiguous().reshape(-1)
    y = torch.empty_like(xc)
    rnd = random_bits(xc.shape, work, x.device, generator) if mode == "stochastic" else xc
    n = xc.numel()
    if n:
        grid = (triton.cdiv(n, block),)
        quantize_kernel[grid](xc, y, rnd, n, BLOCK=block, HAS_RND=mode == "stochastic",
                               IS64=work == torch.float64, **round_constants(fmt, work, mode))
    return y.reshape(x.shape).to(x.dtype)


@triton.jit
def _round_to_odd_add(acc, part):
    s = acc + part
    bp = s - acc
    err = (acc - (s - bp)) + (part - bp)
    bits = s.to(tl.int64, bitcast=True)
    fix = (err != 0) & (tl.abs(err) < float("inf")) & ((bits & 1) == 0)
    step = tl.where((err > 0) == (s > 0), 1, -1).to(tl.int64)
    return tl.where(fix, bits + step, bits).to(tl.float64, bitcast=True)


@triton.jit
def emulated_mm_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, seed,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKP: tl.constexpr, ROUND_TO_ODD: tl.constexpr,
    A_MC: tl.constexpr, A_R0: tl.constexpr, A_EMIN_FIELD: tl.constexpr, A_MAX_BITS: tl.constexpr,
    A_INF_BITS: tl.constexpr, A_Q_BITS: tl.constexpr, A_HALF_Q_BITS: tl.constexpr, A_Q: tl.constexpr,
    A_RSCALE: tl.constexpr, A_MODE: tl.constexpr, A_OVERFLOW: tl.constexpr, A_RMASK: tl.constexpr,
    O_MC: tl.constexpr, O_R0: tl.constexpr, O_EMIN_FIELD: tl.constexpr, O_MAX_BITS: tl.constexpr,
    O_INF_BITS: tl.constexpr, O_Q_BITS: tl.constexpr, O_HALF_Q_BITS: tl.constexpr, O_Q: tl.constexpr,
    O_RSCALE: tl.constexpr, O_MODE: tl.constexpr, O_OVERFLOW: tl.constexpr, O_RMASK: tl.constexpr,
):
    """One (BM, BN) tile of one batch entry. Inputs are float64 already rounded to in_fmt; every k-block
    of BK products is summed in float64 (the exact block sum only where ``spec.block_sums_exact`` holds:
    ``emulated_matmul`` checks that and otherwise uses the torch reference), added to the accumulator with
    round-to-odd and rounded to the acc format."""
    pid_b = tl.program_id(2)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BKP)
    a_base = a_ptr + pid_b * s_ab
    b_base = b_ptr + pid_b * s_bb
    acc = tl.zeros([BM, BN], dtype=tl.float64)
    for k0 in range(0, K, BK):
        part = tl.zeros([BM, BN], dtype=tl.float64)
        for c0 in range(0, BK, BKP):  # the block in chunks of BKP products, summed in float64
            kk = k0 + c0 + rk
            kmask = (c0 + rk < BK) & (kk < K)
            a = tl.load(a_base + rm[:, None] * s_am + kk[None, :] * s_ak,
                        mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
            b = tl.load(b_base + kk[:, None] * s_bk + rn[None, :] * s_bn,
                        mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
            part += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        if ROUND_TO_ODD:
            s = _round_to_odd_add(acc, part)
        else:
            s = acc + part
        if A_MODE == 4:
            offs = (pid_b * M + rm[:, None]) * N + rn[None, :]
            r0, r1, _, _ = tl.randint4x(seed + k0, offs)
            rnd = ((r0.to(tl.int64) << 32) | r1.to(tl.int64)) & A_RMASK
        else:
            rnd = tl.zeros([BM, BN], dtype=tl.int64)
        acc = _round(s, rnd, A_MC, A_R0, A_EMIN_FIELD, A_MAX_BITS, A_INF_BITS, A_Q_BITS, A_HALF_Q_BITS, A_Q,
                     A_RSCALE, A_MODE, A_OVERFLOW, True)
    out = _round(acc, tl.zeros([BM, BN], dtype=tl.int64), O_MC, O_R0, O_EMIN_FIELD, O_MAX_BITS, O_INF_BITS,
                 O_Q_BITS, O_HALF_Q_BITS, O_Q, O_RSCALE, O_MODE, O_OVERFLOW, True)
    c_ptrs = c_ptr + pid_b * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn
    tl.store(c_ptrs, out, mask=(rm[:, None] < M) & (rn[None, :] < N))


def prefixed_constants(prefix: str, consts: dict) -> dict:
    """``round_constants`` as the matmul kernel's keyword arguments (``A_`` accumulator, ``O_`` output)."""
    return {f"{prefix}_{k}": v for k, v in {**consts, "RMASK": 2 ** consts["MC"] - 1}.items()}


def emulated_matmul_triton(a: torch.Tensor, b: torch.Tensor, in_fmt: FloatFormat, acc_fmt: FloatFormat,
                           out_fmt: FloatFormat, block_k: int = 1, mode: str = "rne",
                           generator: torch.Generator | None = None, tile: int = 16,
                           chunk: int = 16) -> torch.Tensor:
    """Triton version of :func:`common.lowp.reference.emulated_matmul_torch` (float64 containers): the same
    results when every block's float64 sum is exact (``spec.block_sums_exact``; typical for bf16/fp16/fp8
    operands), else each block sum is rounded once in float64 (2^-53 relative to sum |products|)."""
    check_matmul_args(a, b, block_k)
    _check_device(a)
    aq = quantize_triton(a.to(torch.float64), in_fmt)
    bq = quantize_triton(b.to(torch.float64), in_fmt)
    squeeze = aq.dim() == 2 and bq.dim() == 2
    a3 = aq if aq.dim() == 3 else aq.unsqueeze(0)
    b3 = bq if bq.dim() == 3 else bq.unsqueeze(0)
    batch = max(a3.shape[0], b3.shape[0])
    m, k = a3.shape[1:]
    n = b3.shape[2]
    c = torch.empty(batch, m, n, dtype=torch.float64, device=a.device)
    seed = 0
    if mode == "stochastic":
        seed = int(torch.randint(0, 2**30, (1,), generator=generator, device=generator.device
                                 if generator is not None else "cpu").item())
    bkp = min(triton.next_power_of_2(block_k), chunk)  # (BM, BKP, BN) products live in registers
    grid = (triton.cdiv(m, tile), triton.cdiv(n, tile), batch)
    emulated_mm_kernel[grid](
        a3, b3, c, m, n, k, seed,
        a3.stride(0) if a3.shape[0] > 1 else 0, a3.stride(1), a3.stride(2),
        b3.stride(0) if b3.shape[0] > 1 else 0, b3.stride(1), b3.stride(2),
        c.stride(0), c.stride(1), c.stride(2),
        BM=tile, BN=tile, BK=block_k, BKP=bkp, ROUND_TO_ODD=acc_fmt.man_bits <= 50,
        **prefixed_constants("A", round_constants(acc_fmt, torch.float64, mode)),
        **prefixed_constants("O", round_constants(out_fmt, torch.float64, "rne")),
    )
    out = c[0] if squeeze else c
    return out.to(output_dtype(out_fmt))

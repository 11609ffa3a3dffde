"""Matrix multiplication with an emulated low-precision accumulator (PyTorch reference + dispatch).

The model of ``C = A @ B`` (per output element, k = 0..K-1 in order, blocks of ``block_k``):

    a, b   = round(A, in_fmt), round(B, in_fmt)                  # RNE
    acc    = 0
    for each k-block:  acc = round(acc + sum_{k in block} a_ik b_kj, acc_fmt, mode)
    C      = round(acc, out_fmt)                                  # RNE

``block_k = 1`` rounds after every addition (recursive summation in acc_fmt: cuBLAS fp16-accumulate GEMMs,
the authors' "strict" setting); larger blocks round once per block (the authors' "efficient" setting with
32; Hopper fp8 "fast accumulation" ~ acc_fmt=(8, 13), mode="rz", a block per MMA instruction).

Arithmetic is done in float64 containers: a product of two numbers with p <= 26 significand bits (every
e <= 8, m <= 23 format) is exact in float64 and so is the in-block sum whenever the products' exponents
span < ~29 binades (always true in practice for block sums of random data; otherwise the block sum is
rounded once in float64, 2^-53 relative). Each accumulator update ``acc + block`` is computed with
TwoSum and rounded to odd in float64, then rounded to acc_fmt: rounding to odd at >= p+2 bits and then to
p bits is the correctly rounded result for every mode (Boldo & Melquiond), so no double rounding.
Formats with more than 51 fraction bits (fp64) are used as plain float64 arithmetic. Strict fp32
accumulation (acc_fmt = fp32, block_k = 1, RNE) uses float32 hardware additions when every product is a
float32 number (the same function, much faster).
"""

from __future__ import annotations

import torch

from common.lowp.formats import FORMATS, FloatFormat, get_format
from common.lowp.quantize import _check_mode, quantize_torch

FMTLike = FloatFormat | str | tuple[int, int]


def round_to_odd_add(acc: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``acc + part`` (float64) rounded to odd: the float64 neighbour with an odd last bit when inexact."""
    s = acc + part
    bp = s - acc
    err = (acc - (s - bp)) + (part - bp)  # TwoSum: acc + part == s + err exactly
    bits = s.view(torch.int64)
    fix = (err != 0) & torch.isfinite(err) & ((bits & 1) == 0)
    step = torch.where((err > 0) == (s > 0), 1, -1)  # move the magnitude toward the exact value
    return torch.where(fix, bits + step, bits).view(torch.float64)


def output_dtype(out_fmt: FloatFormat) -> torch.dtype:
    return torch.float32 if out_fmt.fits_in(FORMATS["fp32"]) else torch.float64


def check_matmul_args(a: torch.Tensor, b: torch.Tensor, block_k: int) -> None:
    if a.dim() not in (2, 3) or b.dim() not in (2, 3):
        raise ValueError(f"emulated_matmul takes 2-D or batched 3-D inputs, got {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"batch sizes differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if block_k < 1:
        raise ValueError(f"block_k must be >= 1, got {block_k}")


def _fp32_hardware_exact(aq: torch.Tensor, bq: torch.Tensor, in_fmt: FloatFormat, acc_fmt: FloatFormat) -> bool:
    """True when float32 hardware addition *is* the model (strict fp32 RNE accumulation): the accumulator
    format is exactly fp32 and every product is a float32 number (<= 12-bit significands, and no product
    below 2^(2p-149) or above 2^127 in magnitude, checked on the data)."""
    fp32 = FORMATS["fp32"]
    if (acc_fmt.exp_bits, acc_fmt.man_bits, acc_fmt.exponent_bias, acc_fmt.subnormals, acc_fmt.specials,
            acc_fmt.overflow) != (8, 23, 127, True, "ieee", "inf") or 2 * in_fmt.precision > fp32.precision:
        return False
    na, nb = aq[aq != 0].abs(), bq[bq != 0].abs()
    if na.numel() == 0 or nb.numel() == 0:
        return True
    lo = na.min().item() * nb.min().item()
    hi = na.max().item() * nb.max().item()
    return lo >= 2.0 ** (2 * in_fmt.precision - 149) and hi < 2.0**127


def _fp32_recursive_sum(aq: torch.Tensor, bq: torch.Tensor) -> torch.Tensor:
    """sum_k a_ik b_kj in float32, one RNE addition after another (k in order); exact products."""
    a32, b32 = aq.to(torch.float32), bq.to(torch.float32)
    acc = a32[..., :, :1] * b32[..., :1, :]
    for k in range(1, a32.shape[-1]):
        acc = acc + a32[..., :, k:k + 1] * b32[..., k:k + 1, :]
    return acc.to(torch.float64)


def emulated_matmul_torch(a: torch.Tensor, b: torch.Tensor, in_fmt: FloatFormat, acc_fmt: FloatFormat,
                          out_fmt: FloatFormat, block_k: int = 1, mode: str = "rne",
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`emulated_matmul` (float64 containers, any device)."""
    check_matmul_args(a, b, block_k)
    aq = quantize_torch(a.to(torch.float64), in_fmt)
    bq = quantize_torch(b.to(torch.float64), in_fmt)
    k_total = aq.shape[-1]
    if block_k == 1 and mode == "rne" and _fp32_hardware_exact(aq, bq, in_fmt, acc_fmt):
        return quantize_torch(_fp32_recursive_sum(aq, bq), out_fmt).to(output_dtype(out_fmt))
    exact_acc = acc_fmt.man_bits <= 51
    acc = None
    for k0 in range(0, k_total, block_k):
        k1 = min(k0 + block_k, k_total)
        part = aq[..., k0:k1] @ bq[..., k0:k1, :]
        if acc is None:
            acc = torch.zeros_like(part)
        s = round_to_odd_add(acc, part) if exact_acc else acc + part
        acc = quantize_torch(s, acc_fmt, mode, generator)
    if acc is None:  # K == 0: an empty sum
        acc = aq @ bq
    return quantize_torch(acc, out_fmt).to(output_dtype(out_fmt))


def emulated_matmul(a: torch.Tensor, b: torch.Tensor, in_fmt: FMTLike = "fp32", acc_fmt: FMTLike = "fp32",
                    out_fmt: FMTLike = "fp32", block_k: int = 1, mode: str = "rne",
                    generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """``a @ b`` with inputs rounded to ``in_fmt``, exact products, the running sum rounded to ``acc_fmt``
    (``mode``) after every ``block_k`` products, and the result rounded to ``out_fmt`` (RNE).

    2-D or batched 3-D inputs (a 2-D operand broadcasts over the batch). Returns float32 (float64 when
    out_fmt does not fit in float32). ``backend``: "torch", "triton" or "auto" (Triton on CUDA).
    """
    in_fmt, acc_fmt, out_fmt = get_format(in_fmt), get_format(acc_fmt), get_format(out_fmt)
    _check_mode(mode)
    check_matmul_args(a, b, block_k)
    if backend == "auto":
        backend = "triton" if a.is_cuda else "torch"
    if backend == "torch":
        return emulated_matmul_torch(a, b, in_fmt, acc_fmt, out_fmt, block_k, mode, generator)
    if backend == "triton":
        from common.lowp.triton_kernels import emulated_matmul_triton

        return emulated_matmul_triton(a, b, in_fmt, acc_fmt, out_fmt, block_k, mode, generator)
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")

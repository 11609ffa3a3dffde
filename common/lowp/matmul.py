"""``emulated_matmul``: matrix multiplication with an emulated low-precision accumulator, dispatched to a backend
(the PyTorch reference ``reference.emulated_matmul_torch`` or ``triton_kernels.emulated_matmul_triton``).

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

from common.lowp.formats import FloatFormat, get_format
from common.lowp.reference import emulated_matmul_torch
from common.lowp.spec import check_matmul_args, check_mode

__all__ = ["FMTLike", "emulated_matmul", "emulated_matmul_torch"]

FMTLike = FloatFormat | str | tuple[int, int]


def emulated_matmul(a: torch.Tensor, b: torch.Tensor, in_fmt: FMTLike = "fp32", acc_fmt: FMTLike = "fp32",
                    out_fmt: FMTLike = "fp32", block_k: int = 1, mode: str = "rne",
                    generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """``a @ b`` with inputs rounded to ``in_fmt``, exact products, the running sum rounded to ``acc_fmt``
    (``mode``) after every ``block_k`` products, and the result rounded to ``out_fmt`` (RNE).

    2-D or batched 3-D inputs (a 2-D operand broadcasts over the batch). Returns float32 (float64 when
    out_fmt does not fit in float32). ``backend``: "torch", "triton" or "auto" (Triton on CUDA).
    """
    in_fmt, acc_fmt, out_fmt = get_format(in_fmt), get_format(acc_fmt), get_format(out_fmt)
    check_mode(mode)
    check_matmul_args(a, b, block_k)
    if backend == "auto":
        backend = "triton" if a.is_cuda else "torch"
    if backend == "torch":
        return emulated_matmul_torch(a, b, in_fmt, acc_fmt, out_fmt, block_k, mode, generator)
    if backend == "triton":
        from common.lowp.triton_kernels import emulated_matmul_triton

        return emulated_matmul_triton(a, b, in_fmt, acc_fmt, out_fmt, block_k, mode, generator)
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")

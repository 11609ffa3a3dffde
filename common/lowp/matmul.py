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

Arithmetic is done in float64 containers. A product of two numbers with p <= 26 significand bits (every
e <= 8, m <= 23 format; precisely ``spec.products_exact``) is exact in float64. The block sum is exact too:
where ``spec.exact_block_mask`` certifies that the float64 sum of a block cannot round (every partial sum
is a multiple of the products' common last-bit grid with <= 53 bits: typical for bf16/fp16/fp8 operands)
it is the BLAS matmul of the block; elsewhere (fp32 operands: 48-bit products leave only 5 binades of
spread) the block's products and the accumulator are summed exactly with error-free transformations
(``reference.exact_block_update``: ExtractVector levels, Grow-Expansion, exact sign tests). The exact
``acc + block`` is rounded to odd in float64 and then to acc_fmt: rounding to odd at >= p+2 bits and then
to p bits is the correctly rounded result for every mode (Boldo & Melquiond), so no double rounding; acc
formats with more than 50 fraction bits (fp64) get the exact sum rounded to nearest float64 first (fp64:
correctly rounded RNE; directed modes are RNE there). Operand formats whose products are not float64
numbers (fp64, > 26-bit significands) use plain float64 products and block sums. Strict fp32
accumulation (acc_fmt = fp32, block_k = 1, RNE) uses float32 hardware additions when every product is a
float32 number (the same function, much faster).

The Triton kernel sums each block in float64 (no exact path): ``emulated_matmul(backend="triton")`` runs
it only when ``spec.block_sums_exact`` holds for the data (then it is the model, bit for bit), else the
torch reference on the same device.
"""

from __future__ import annotations

import torch

from common.lowp.formats import FloatFormat, get_format
from common.lowp.reference import emulated_matmul_torch, quantize_torch
from common.lowp.spec import block_sums_exact, check_matmul_args, check_mode, products_exact

__all__ = ["FMTLike", "emulated_matmul", "emulated_matmul_torch"]

FMTLike = FloatFormat | str | tuple[int, int]


def emulated_matmul(a: torch.Tensor, b: torch.Tensor, in_fmt: FMTLike = "fp32", acc_fmt: FMTLike = "fp32",
                    out_fmt: FMTLike = "fp32", block_k: int = 1, mode: str = "rne",
                    generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """``a @ b`` with inputs rounded to ``in_fmt``, exact products, the running sum rounded to ``acc_fmt``
    (``mode``) after every ``block_k`` products, and the result rounded to ``out_fmt`` (RNE).

    2-D or batched 3-D inputs (a 2-D operand broadcasts over the batch). Returns float32 (float64 when
    out_fmt does not fit in float32). ``backend``: "torch", "triton" or "auto" (Triton on CUDA; "triton"
    falls back to the torch reference where the kernel's float64 block sums could round).
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

        # The kernel's float64 block sums are the model only where they cannot round (see module docstring).
        aq, bq = quantize_torch(a.to(torch.float64), in_fmt), quantize_torch(b.to(torch.float64), in_fmt)
        if products_exact(in_fmt) and not block_sums_exact(aq, bq, in_fmt, block_k):
            return emulated_matmul_torch(a, b, in_fmt, acc_fmt, out_fmt, block_k, mode, generator)

        return emulated_matmul_triton(a, b, in_fmt, acc_fmt, out_fmt, block_k, mode, generator)
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")

"""``quantize``: rounding to a FloatFormat, dispatched to a backend.

Backends (all bit-identical, stochastic rounding included: they draw the same random integers from the same
generator call): ``reference.quantize_torch`` (PyTorch integer operations on the bit pattern; the algorithm
is described there), ``cpu_kernels.quantize_numba`` (numba, CPU) and ``triton_kernels.quantize_triton``
(CUDA, or the CPU interpreter). This module only picks one; the backends import nothing from it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from common.lowp.formats import FloatFormat, container_format, get_format
from common.lowp.reference import native_cast_dtype, quantize_torch
from common.lowp.spec import MODES, check_mode

__all__ = ["MODES", "auto_backend", "numba_enabled", "quantize", "quantize_torch", "triton_supports"]


def numba_enabled() -> bool:
    """numba is installed and not switched off with ``LLM4ALL_NO_NUMBA=1`` (read on every call)."""
    return os.environ.get("LLM4ALL_NO_NUMBA", "0") != "1" and _numba_installed()


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def triton_supports(fmt: FloatFormat) -> bool:
    """The Triton kernels model signed formats with a signed zero; the fnuz formats (no -0) and the unsigned
    e8m0 scale (no zero, no sign) run on the torch reference instead (any device)."""
    return fmt.has_negative_zero and fmt.signed


def auto_backend(x: torch.Tensor, fmt: FloatFormat | str | tuple[int, int] | None = None) -> str:
    """The backend ``quantize(..., backend="auto")`` uses for ``x`` (and ``fmt``, when given): Triton on CUDA
    (torch for formats Triton does not model, see :func:`triton_supports`); numba on CPU when enabled,
    except under autograd (the torch path's bf16/fp16 native cast keeps a gradient); else torch. (RNE to
    fp16 from float32 then still takes torch's native cast, the faster of the two.)"""
    if x.is_cuda:
        return "triton" if fmt is None or triton_supports(get_format(fmt)) else "torch"
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
    any format up to fp64; float32 inputs any format with e <= 8, m <= 23 and IEEE-sized range, and formats
    whose numbers are float32 numbers below float32's normal range, e8m0fnu, which are rounded in float64).
    The fnuz formats and e8m0fnu are not modelled by the Triton kernels: ``backend="triton"`` raises for
    them and ``"auto"`` takes the torch reference on CUDA.
    """
    fmt = get_format(fmt)
    check_mode(mode)
    if mode == "stochastic" and generator is None and seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
    if _needs_float64(x, fmt):
        # Rounding in float64 is one rounding, and the result converts back to x's dtype exactly.
        return quantize(x.double(), fmt, mode, generator, backend=backend).to(x.dtype)
    if backend == "triton" and not triton_supports(fmt):
        raise ValueError(f"backend='triton' does not model format {fmt} (no -0 or unsigned); use "
                         f"backend='torch' (any device) or 'auto'")
    if backend == "auto":
        backend = auto_backend(x, fmt)
        # torch's float32 -> fp16 cast (F16C hardware) is the identical function and beats the numba kernel.
        if backend == "torch" or (backend == "numba" and native_cast_dtype(fmt, x, mode) == torch.float16):
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


def _needs_float64(x: torch.Tensor, fmt: FloatFormat) -> bool:
    """Every number of ``fmt`` is a number of x's float32/bf16 dtype, but its normal range reaches below the
    container's (e8m0fnu: 2^-127 is a float32 subnormal): the float32 routine cannot round there, so
    ``quantize`` rounds in float64 (the backends alone raise for such a float32 input)."""
    if not x.is_floating_point() or x.dtype == torch.float64:
        return False
    cf = container_format(x.dtype)
    return (not fmt.fits_in(cf) and fmt.man_bits <= cf.man_bits and fmt.max_normal <= cf.max_normal
            and fmt.emin - fmt.man_bits >= cf.emin - cf.man_bits)

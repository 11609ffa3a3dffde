"""What every backend shares: rounding-mode and overflow codes, integer views of the containers, the integer
constants that describe a format inside a container, and the argument checks.

Layer 1 of ``common.lowp`` (with ``formats.py``): it imports nothing from the package but ``formats``; the
backends (``reference.py``, ``cpu_kernels.py``, ``triton_kernels.py``) import only this layer, and
``quantize.py`` / ``matmul.py`` dispatch to the backends.
"""

from __future__ import annotations

import torch

from common.lowp.formats import FORMATS, OVERFLOWS, FloatFormat, container_format

MODES = ("rne", "rz", "ru", "rd", "stochastic")
# The integer codes the compiled kernels (numba, Triton) branch on: the position in MODES / OVERFLOWS.
MODE_CODES = {mode: i for i, mode in enumerate(MODES)}
OVERFLOW_CODES = {overflow: i for i, overflow in enumerate(OVERFLOWS)}
# The integer view of each container's bit pattern (float16/bfloat16 are widened to float32 first).
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}


def check_mode(mode: str) -> str:
    """``mode`` if it is one of MODES, else ValueError."""
    if mode not in MODES:
        raise ValueError(f"rounding mode must be one of {MODES}, got {mode!r}")
    return mode


def bits_of(value: float, dtype: torch.dtype) -> int:
    """The bit pattern of ``value`` in container ``dtype`` (float32 or float64) as a Python int."""
    return int(torch.tensor(value, dtype=dtype).view(INT_VIEW[dtype]).item())


def format_constants(fmt: FloatFormat, dtype: torch.dtype) -> dict:
    """Integer constants for rounding ``fmt`` inside container ``dtype`` (float32 or float64)."""
    cf = container_format(dtype)
    q = fmt.min_subnormal
    return {
        "MC": cf.man_bits, "R0": cf.man_bits - fmt.man_bits, "EMIN_FIELD": fmt.emin + cf.exponent_bias,
        "MAX_BITS": bits_of(fmt.max_normal, dtype), "INF_BITS": bits_of(float("inf"), dtype),
        "Q_BITS": bits_of(q, dtype), "HALF_Q_BITS": bits_of(q / 2, dtype), "Q": q,
        "MIN_NORMAL_BITS": bits_of(fmt.min_normal, dtype),
    }


def needs_work(fmt: FloatFormat, dtype: torch.dtype) -> bool:
    """False when rounding ``dtype`` values to ``fmt`` is the identity (fmt contains the container)."""
    cf = container_format(dtype)
    return not (cf.fits_in(fmt) and fmt.subnormals and fmt.specials == "ieee" and fmt.overflow == "inf")


def same_range_ieee(fmt: FloatFormat, dtype: torch.dtype) -> bool:
    """``fmt`` has the container's exponent range, subnormals and IEEE specials/overflow (bf16, tf32 and fp22
    from float32): rounding is then a constant number of dropped bits on the signed pattern, with the carry
    walking into the exponent up to inf (the backends' shortcut)."""
    cf = container_format(dtype)
    return (fmt.emin == cf.emin and fmt.emax == cf.emax and fmt.subnormals and fmt.specials == "ieee"
            and fmt.overflow == "inf")


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
    """Uniform integers in [0, 2^Mc) for stochastic rounding (Mc = container mantissa bits). Every backend
    draws them with this one call, so all give the same results for the same generator state."""
    mc = container_format(dtype).man_bits
    return torch.randint(0, 2**mc, shape, generator=generator, dtype=INT_VIEW[dtype], device=device)


def output_dtype(out_fmt: FloatFormat) -> torch.dtype:
    """The dtype ``emulated_matmul`` returns for ``out_fmt``: float32 when it fits, else float64."""
    return torch.float32 if out_fmt.fits_in(FORMATS["fp32"]) else torch.float64


def check_matmul_args(a: torch.Tensor, b: torch.Tensor, block_k: int) -> None:
    """Shapes ``emulated_matmul`` accepts: 2-D or batched 3-D, matching inner and batch dims; block_k >= 1."""
    if a.dim() not in (2, 3) or b.dim() not in (2, 3):
        raise ValueError(f"emulated_matmul takes 2-D or batched 3-D inputs, got {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"batch sizes differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if block_k < 1:
        raise ValueError(f"block_k must be >= 1, got {block_k}")


def products_exact(in_fmt: FloatFormat) -> bool:
    """Every product of two ``in_fmt`` numbers is a float64 number: <= 26-bit significands (so <= 52-bit
    products), no product below float64's subnormal grid 2^-1074 and none above its range."""
    return (in_fmt.precision <= 26 and 2 * (in_fmt.emin - in_fmt.man_bits) >= -1074
            and 2 * (in_fmt.emax + 1) <= 1023)



def exact_block_mask(a_blk: torch.Tensor, b_blk: torch.Tensor, in_fmt: FloatFormat) -> torch.Tensor:
    """Per output element, True where the float64 sum of the block's products ``sum_k a_ik b_kj`` is exact
    in every summation order (BLAS blocking, FMA included); ``a_blk``/``b_blk``: one k-block of the operands
    (values of ``in_fmt``, float64, products exact: ``products_exact``). Why: the last bit of a nonzero
    ``in_fmt`` value x is not below ``l(x) = max(floor(log2|x|), emin) - man_bits``, so every product and
    partial sum is a multiple of ``g = 2^min_k (l(a_ik) + l(b_kj))``, and ``1/g <= G = sum_k 2^-l(a_ik)
    2^-l(b_kj)``; every partial sum is at most ``T = sum_k |a_ik b_kj|``, so it is representable when
    ``T G <= 2^53``. T and G are float64 matmuls, each within a factor (1 + block_k 2^-53) of the true
    value: testing ``T G <= 2^52`` leaves a factor 2 for their rounding (any block_k < 2^50)."""
    _, ea = torch.frexp(a_blk)  # |x| = f 2^e, f in [0.5, 1): floor(log2|x|) = e - 1
    _, eb = torch.frexp(b_blk)
    wa = torch.where(a_blk != 0, torch.ldexp(torch.ones_like(a_blk), -((ea - 1).clamp_min(in_fmt.emin)
                                                                        - in_fmt.man_bits)), 0.0)
    wb = torch.where(b_blk != 0, torch.ldexp(torch.ones_like(b_blk), -((eb - 1).clamp_min(in_fmt.emin)
                                                                        - in_fmt.man_bits)), 0.0)
    t = a_blk.abs() @ b_blk.abs()
    return (t == 0) | (t * (wa @ wb) <= 2.0**52)


def block_sums_exact(aq: torch.Tensor, bq: torch.Tensor, in_fmt: FloatFormat, block_k: int) -> bool:
    """True when every k-block's float64 product sum is exact for these (rounded) operands
    (:func:`exact_block_mask` on every block; products exact). Typical for bf16/fp16/fp8 operands of
    moderate range; rarely true for fp32 operands (48-bit products leave 5 bits for exponent spread)."""
    if not products_exact(in_fmt):
        return False
    if block_k == 1:
        return True  # one product per block: exact by itself
    k = aq.shape[-1]
    return all(bool(exact_block_mask(aq[..., k0:k0 + block_k], bq[..., k0:k0 + block_k, :], in_fmt).all())
               for k0 in range(0, k, block_k))

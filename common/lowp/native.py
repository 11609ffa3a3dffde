"""Native low-precision matmul on the GPU: bf16 / fp16 / fp8 (e4m3fn, e5m2) inputs, fp32 accumulation.

``native_matmul(a, b, a_scale, b_scale)`` computes ``(a_scale * a) @ (b_scale * b)`` with a Triton kernel
(tutorial-03 structure: grouped tile order, fp32 accumulator ``acc = tl.dot(a, b, acc)``, per-tensor fp32
scales applied once at the end, output cast to ``out_dtype``), autotuned over tile shapes. For fp8 on
Hopper, Triton's default ``max_num_imprecise_acc`` (2^30 on sm_90) lets the tensor core's reduced-precision
accumulator run the whole tile loop ("fast accumulation"); ``max_num_imprecise_acc=k`` (k <= BK <= 128)
promotes to an fp32 accumulator every k products (DeepSeek-V3 style); ``0`` makes Triton avoid imprecise
accumulation altogether (on sm_90 it then emits no fp8 wgmma: checked by compiling for sm_90 offline).
``gpu_check.py`` compares them with the emulation.

Without CUDA it falls back (with a warning naming the reason) to a float32 PyTorch matmul of the
dequantised inputs: same math, no low-precision tensor-core arithmetic.
"""

from __future__ import annotations

import os
import warnings

import torch

LOWP_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

try:  # Triton is optional at import time: CPU-only installs still get the fallback
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _configs() -> list:
    shapes = [(128, 256, 64, 3, 8), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4),
              (64, 128, 32, 4, 4), (128, 128, 64, 3, 8), (256, 128, 64, 3, 8), (64, 64, 64, 4, 4),
              (128, 128, 128, 3, 8), (128, 256, 128, 3, 8)]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in shapes]


if triton is not None:

    @triton.jit
    def native_mm_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                          HAS_SCALE: tl.constexpr, IMPRECISE: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        group = GROUP_M * num_n  # grouped ordering: neighbouring programs share A rows (L2 reuse)
        first_m = (pid // group) * GROUP_M
        group_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % group) % group_m)
        pid_n = (pid % group) // group_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak
        b_ptrs = b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)
            b = tl.load(b_ptrs, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)
            if IMPRECISE >= 0:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=IMPRECISE)
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BK * s_ak
            b_ptrs += BK * s_bk
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr)
        c = acc.to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, c, mask=(rm[:, None] < M) & (rn[None, :] < N))

    def _prune(configs, named_args, **kwargs):
        # tl.dot needs max_num_imprecise_acc <= its K (= BK)
        imprecise = named_args.get("IMPRECISE", kwargs.get("IMPRECISE", -1))
        return [c for c in configs if c.kwargs["BK"] >= imprecise]

    _native_mm_autotuned = triton.autotune(configs=_configs(), key=["M", "N", "K", "HAS_SCALE", "IMPRECISE"],
                                           prune_configs_by={"early_config_prune": _prune})(native_mm_kernel)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"native_matmul takes 2-D (M, K) @ (K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in LOWP_DTYPES + (torch.float32,):
        raise TypeError(f"native_matmul needs both inputs of one dtype in {LOWP_DTYPES}, got {a.dtype}, {b.dtype}")


def combined_scale(a_scale, b_scale, device) -> torch.Tensor | None:
    if a_scale is None and b_scale is None:
        return None
    sa = torch.as_tensor(1.0 if a_scale is None else a_scale, dtype=torch.float32, device=device).reshape(())
    sb = torch.as_tensor(1.0 if b_scale is None else b_scale, dtype=torch.float32, device=device).reshape(())
    return (sa * sb).reshape(1)


def native_matmul_reference(a: torch.Tensor, b: torch.Tensor, a_scale=None, b_scale=None,
                            out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float64 reference of the same computation (exact products, scales applied to the sum)."""
    scale = combined_scale(a_scale, b_scale, a.device)
    c = a.to(torch.float64) @ b.to(torch.float64)
    if scale is not None:
        c = c * scale.to(torch.float64)
    return c.to(out_dtype)


def native_matmul(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | float | None = None,
                  b_scale: torch.Tensor | float | None = None, out_dtype: torch.dtype | None = None,
                  max_num_imprecise_acc: int | None = None, autotune: bool = True,
                  block: tuple[int, int, int] = (32, 32, 32)) -> torch.Tensor:
    """``(a_scale * a) @ (b_scale * b)`` on the tensor cores with fp32 accumulation (Triton).

    ``a``, ``b``: 2-D, same dtype (bf16, fp16, fp8 e4m3fn/e5m2; float32 is accepted for interpreter tests).
    Scales: per-tensor fp32 (scalar or 1-element tensor). ``out_dtype``: default bf16 for fp8 inputs, else the
    input dtype. ``max_num_imprecise_acc``: fp8 on sm_90 only, see the module docstring. ``autotune=False``
    uses the fixed ``block`` = (BM, BN, BK) (used under the Triton interpreter).
    """
    _check(a, b)
    if out_dtype is None:
        out_dtype = torch.bfloat16 if a.dtype in FP8_DTYPES else a.dtype
    interpret = triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if triton is None or not (a.is_cuda or interpret):
        warnings.warn("native_matmul: no CUDA device (or Triton missing), falling back to a float32 PyTorch "
                      "matmul of the dequantised inputs; no low-precision tensor-core arithmetic is exercised",
                      RuntimeWarning, stacklevel=2)
        scale = combined_scale(a_scale, b_scale, a.device)
        c = a.to(torch.float32) @ b.to(torch.float32)
        return (c if scale is None else c * scale).to(out_dtype)
    if a.dtype == torch.float32 and not interpret:
        raise TypeError("native_matmul: float32 inputs are for interpreter tests only (tl.dot would use tf32); "
                        "use torch.matmul for float32")
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    scale = combined_scale(a_scale, b_scale, a.device)
    args = (a, b, c, scale if scale is not None else c, m, n, k, a.stride(0), a.stride(1), b.stride(0),
            b.stride(1), c.stride(0), c.stride(1))
    imprecise = -1 if max_num_imprecise_acc is None else int(max_num_imprecise_acc)
    if not -1 <= imprecise <= 128:
        raise ValueError(f"max_num_imprecise_acc must be None or in 0..128 (<= the tile BK), got {imprecise}")
    if autotune and not interpret:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
        _native_mm_autotuned[grid](*args, HAS_SCALE=scale is not None, IMPRECISE=imprecise)
    else:
        bm, bn, bk = block
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        native_mm_kernel[grid](*args, BM=bm, BN=bn, BK=bk, GROUP_M=8, HAS_SCALE=scale is not None,
                                IMPRECISE=imprecise)
    return c


def to_fp8(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled fp8 cast: returns (x_fp8, scale) with x ~= scale * x_fp8 and max|x_fp8| at the
    format's max (saturating cast, as torch does)."""
    fmax = torch.finfo(dtype).max
    amax = x.abs().max().to(torch.float32).clamp_min(1e-12)
    scale = amax / fmax
    return (x.to(torch.float32) / scale).clamp(-fmax, fmax).to(dtype), scale

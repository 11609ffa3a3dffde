"""The Triton kernels compile for a Hopper GPU (sm_90) without one: Triton's offline compiler runs the
frontend, the NVIDIA lowering and ptxas. Catches type/shape errors the CPU interpreter does not."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from common.lowp import get_format  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def _compile(fn, signature: dict, constexprs: dict, **options):
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    try:
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=SM90, options=options)
    except (RuntimeError, FileNotFoundError) as exc:  # no ptxas / NVIDIA backend in this Triton build
        if "ptxas" in str(exc) or "backend" in str(exc).lower():
            pytest.skip(f"Triton cannot compile for sm_90 here: {exc}")
        raise


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "rne"), (torch.float64, "stochastic")])
def test_quantize_kernel_compiles_for_sm90(dtype, mode):
    from common.lowp import triton_kernels as tk

    is64 = dtype == torch.float64
    consts = dict(BLOCK=1024, HAS_RND=mode == "stochastic", IS64=is64,
                  **tk.round_constants(get_format("fp8_e4m3fn"), dtype, mode))
    ptr, iptr = ("*fp64", "*i64") if is64 else ("*fp32", "*i32")
    k = _compile(tk.quantize_kernel, {"x_ptr": ptr, "y_ptr": ptr, "rnd_ptr": iptr, "n": "i32"}, consts)
    assert "cubin" in k.asm


@pytest.mark.parametrize("bk,bkp,acc,mode", [(32, 16, "fp22_e8m13", "rz"), (1, 1, "bf16", "stochastic")])
def test_emulated_matmul_kernel_compiles_for_sm90(bk, bkp, acc, mode):
    from common.lowp import triton_kernels as tk

    consts = dict(BM=16, BN=16, BK=bk, BKP=bkp, ROUND_TO_ODD=True,
                  **tk.prefixed_constants("A", tk.round_constants(get_format(acc), torch.float64, mode)),
                  **tk.prefixed_constants("O", tk.round_constants(get_format("bf16"), torch.float64, "rne")))
    sig = {"a_ptr": "*fp64", "b_ptr": "*fp64", "c_ptr": "*fp64", "M": "i32", "N": "i32", "K": "i32", "seed": "i32"}
    sig.update({s: "i32" for s in ["s_ab", "s_am", "s_ak", "s_bb", "s_bk", "s_bn", "s_cb", "s_cm", "s_cn"]})
    assert "cubin" in _compile(tk.emulated_mm_kernel, sig, consts).asm


@pytest.mark.parametrize("dtype,imprecise", [("bf16", -1), ("fp8e4nv", -1), ("fp8e4nv", 32)])
def test_native_kernel_compiles_for_sm90_with_wgmma(dtype, imprecise):
    from common.lowp.native import native_mm_kernel

    consts = dict(BM=128, BN=128, BK=64, GROUP_M=8, HAS_SCALE=dtype.startswith("fp8"), IMPRECISE=imprecise)
    sig = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": "*bf16", "scale_ptr": "*fp32", "M": "i32",
           "N": "i32", "K": "i32"}
    sig.update({s: "i32" for s in ["s_am", "s_ak", "s_bk", "s_bn", "s_cm", "s_cn"]})
    k = _compile(native_mm_kernel, sig, consts, num_warps=8, num_stages=3)
    assert "wgmma.mma_async" in k.asm["ptx"]  # Hopper tensor-core instructions were emitted

"""Native low-precision matmul: CPU fallback here; the tensor-core checks are @pytest.mark.gpu."""

from __future__ import annotations

import pytest
import torch

from common.lowp import emulated_matmul
from common.lowp.native import native_matmul, native_matmul_reference, to_fp8
from tests.lowp.lowp_oracle import assert_same

CUDA = torch.cuda.is_available()


def test_cpu_fallback_warns_and_matches_reference():
    if CUDA:
        pytest.skip("CUDA present: the fallback is not taken")
    a = torch.randn(8, 16).to(torch.bfloat16)
    b = torch.randn(16, 4).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="no CUDA device"):
        c = native_matmul(a, b, a_scale=2.0)
    assert c.dtype == torch.bfloat16
    ref = native_matmul_reference(a, b, 2.0, out_dtype=torch.float64)
    assert torch.allclose(c.double(), ref, rtol=2**-8, atol=1e-6)
    with pytest.raises(TypeError, match="same dtype|one dtype"):
        native_matmul(a, b.float())


def test_to_fp8_scale_roundtrip():
    x = torch.randn(64, 32) * 37
    q, s = to_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.float().abs().max().item() == 448.0
    assert torch.allclose(q.float() * s, x, rtol=2**-3, atol=1e-6 * 37)


def _bound(a64, b64, ref, u_acc, u_out):
    k = a64.shape[1]
    return k * u_acc * (a64.abs() @ b64.abs()) + u_out * ref.abs() + 1e-30


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_half_matches_float64(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(300, 520, device="cuda", generator=g).to(dtype)
    b = torch.randn(520, 170, device="cuda", generator=g).to(dtype)
    c = native_matmul(a, b)
    ref = native_matmul_reference(a, b, out_dtype=torch.float64)
    u_out = 2**-8 if dtype == torch.bfloat16 else 2**-11
    assert ((c.double() - ref).abs() <= _bound(a.double(), b.double(), ref, 2**-23, u_out)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() < (8, 9), reason="needs fp8 tensor cores")
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_native_fp8_matches_float64(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    a, sa = to_fp8(torch.randn(256, 512, device="cuda", generator=g), dtype)
    b, sb = to_fp8(torch.randn(512, 128, device="cuda", generator=g), dtype)
    ref = native_matmul_reference(a, b, sa, sb, out_dtype=torch.float64)
    for imprecise in (None, 32):
        c = native_matmul(a, b, sa, sb, out_dtype=torch.float32, max_num_imprecise_acc=imprecise)
        # fast accumulation: ~13 fraction bits, truncated -> u_acc = 2^-13
        bound = _bound(a.double() * sa.double(), b.double() * sb.double(), ref, 2**-13, 2**-24)
        assert ((c.double() - ref).abs() <= bound).all(), imprecise


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_triton_emulation_on_cuda_equals_torch_reference():
    from common.lowp import quantize

    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(100_000, device="cuda", generator=g)
    x = x * 10 ** (torch.rand(100_000, device="cuda", generator=g) * 8 - 4)
    for fmt in ["bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2", "fp4_e2m1"]:
        for mode in ["rne", "rz", "ru", "rd"]:
            # bit-identical or both NaN (e4m3fn / e2m1 overflow to NaN here, and torch.equal calls NaN != NaN)
            assert_same(quantize(x, fmt, mode, backend="triton").cpu().numpy(),
                        quantize(x, fmt, mode, backend="torch").cpu().numpy(), x.cpu().numpy(), f"{fmt} {mode}")
    a = torch.randn(3, 40, 96, device="cuda", generator=g)
    b = torch.randn(3, 96, 24, device="cuda", generator=g)
    for args in [("fp16", "fp16", "fp16", 1, "rne"), ("fp8_e4m3fn", "fp22_e8m13", "bf16", 32, "rz")]:
        kw = dict(in_fmt=args[0], acc_fmt=args[1], out_fmt=args[2], block_k=args[3], mode=args[4])
        assert torch.equal(emulated_matmul(a, b, backend="triton", **kw), emulated_matmul(a, b, backend="torch", **kw))

"""Triton-interpreter cases, run by test_lowp_triton.py in a subprocess with TRITON_INTERPRET=1.

Not collected directly (no ``test_`` prefix): the interpreter flag must be set before Triton kernels are
first defined, which a fresh process guarantees whatever other test modules imported before.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from common.lowp import emulated_matmul, quantize
from tests.lowp.lowp_oracle import edge_values

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (see test_lowp_triton.py)", allow_module_level=True)

FORMATS = ["bf16", "fp16", "fp8_e4m3fn", "fp8_e4m3fn_sat", "fp8_e5m2", "fp4_e2m1", "tf32", "e5m4"]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((((a == b) & (torch.signbit(a) == torch.signbit(b))) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_quantize_equals_torch(fmt, dtype):
    from common.lowp import get_format

    f = get_format(fmt)
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):
        x = torch.tensor(edge_values(f, rng, n_random=300), dtype=torch.float64).to(dtype)
    x = torch.cat([x, torch.randn(700, dtype=dtype) * 10 ** (torch.rand(700, dtype=dtype) * 12 - 6)])
    with np.errstate(all="ignore"):
        for mode in ["rne", "rz", "ru", "rd", "stochastic"]:
            want = quantize(x, f, mode, seed=5, backend="torch")
            got = quantize(x, f, mode, seed=5, backend="triton")
            assert _same(got, want), (fmt, mode, dtype)


def test_triton_quantize_shapes_and_half_dtypes():
    x = torch.randn(3, 7, 11).to(torch.bfloat16)
    assert torch.equal(quantize(x, "fp8_e4m3fn", backend="triton"), quantize(x, "fp8_e4m3fn", backend="torch"))
    assert quantize(torch.empty(0), "bf16", backend="triton").shape == (0,)


CASES = [("fp16", "fp16", "fp16", 1, "rne"), ("bf16", "bf16", "fp32", 1, "rz"),
         ("fp8_e4m3fn", "fp22_e8m13", "bf16", 4, "rz"), ("fp8_e5m2", "fp16", "fp32", 32, "rne"),
         ("bf16", "bf16", "fp32", 37, "ru"), ("fp16", "e6m6", "fp16", 3, "rd"), ("bf16", "fp32", "fp32", 40, "rne"),
         ("bf16", "fp32", "fp32", 1, "rne")]  # last: the torch side takes its float32-hardware fast path


@pytest.mark.parametrize("in_fmt,acc_fmt,out_fmt,block_k,mode", CASES)
def test_triton_emulated_matmul_equals_torch(in_fmt, acc_fmt, out_fmt, block_k, mode):
    g = torch.Generator().manual_seed(block_k)
    a = torch.randn(2, 17, 40, generator=g, dtype=torch.float64)
    b = torch.randn(2, 40, 9, generator=g, dtype=torch.float64)
    from common.lowp import get_format
    from common.lowp.spec import block_sums_exact

    # the kernel itself runs (emulated_matmul falls back to torch where its float64 block sums could round)
    assert block_sums_exact(quantize(a, in_fmt), quantize(b, in_fmt), get_format(in_fmt), block_k)
    with np.errstate(all="ignore"):
        for bb in (b, b[0]):  # batched and broadcast 2-D right operand
            want = emulated_matmul(a, bb, in_fmt, acc_fmt, out_fmt, block_k=block_k, mode=mode, backend="torch")
            got = emulated_matmul(a, bb, in_fmt, acc_fmt, out_fmt, block_k=block_k, mode=mode, backend="triton")
            assert got.dtype == want.dtype and torch.equal(got, want)
        got2 = emulated_matmul(a[1], b[0], in_fmt, acc_fmt, out_fmt, block_k=block_k, mode=mode, backend="triton")
        assert torch.equal(got2, want[1])


def test_triton_stochastic_matmul_seeded_and_unbiased():
    k = 64  # interpreter time is linear in k; a 5-bit accumulator (spacing 4 at 64) keeps SR noisy
    a = torch.full((32, k), 1.0)
    b = torch.full((k, 1), 1.0 + 2**-6)
    exact = k * (1 + 2**-6)
    with np.errstate(all="ignore"):
        c1 = emulated_matmul(a, b, "fp16", "e8m4", "fp32", 1, "stochastic",
                             generator=torch.Generator().manual_seed(0), backend="triton")
        c2 = emulated_matmul(a, b, "fp16", "e8m4", "fp32", 1, "stochastic",
                             generator=torch.Generator().manual_seed(0), backend="triton")
    assert torch.equal(c1, c2) and c1.unique().numel() > 1
    sem = c1.std().item() / 32**0.5
    assert abs(c1.mean().item() - exact) < 4 * sem  # unbiased within 4 standard errors


def test_native_kernel_logic_in_interpreter():
    """The native kernel's tiling, masking, grouping and scaling (float32 containers holding fp16 values:
    the interpreter has no low-precision arithmetic; dtype-specific paths are checked by gpu_check.py)."""
    from common.lowp.native import native_matmul, native_matmul_reference

    g = torch.Generator().manual_seed(0)
    a = torch.randn(70, 100, generator=g).half().float()
    b = torch.randn(100, 45, generator=g).half().float()
    for scales in [(None, None), (torch.tensor(0.5), 3.0)]:
        c = native_matmul(a, b, *scales, out_dtype=torch.float32, autotune=False, block=(32, 16, 16))
        ref = native_matmul_reference(a, b, *scales, out_dtype=torch.float64)
        bound = 100 * 2**-24 * (a.double().abs() @ b.double().abs()) * (1.5 if scales[0] is not None else 1)
        assert c.shape == (70, 45) and ((c.double() - ref).abs() <= bound).all()
    bt = b.t().contiguous().t()  # column-major right operand
    c2 = native_matmul(a, bt, out_dtype=torch.float32, autotune=False, block=(16, 32, 32))
    assert torch.allclose(c2.double(), native_matmul_reference(a, b, out_dtype=torch.float64), rtol=1e-5, atol=1e-4)


def test_triton_block_sum_exactness_condition():
    """The kernel's float64 block sum is exact only under ``block_sums_exact``: on the reviewer's fp32 block
    (a tie broken by a residue 2^-60 below) the kernel alone gives 1.0, while ``emulated_matmul`` sees the
    condition fail and returns the exact model's 1 + 2^-23 (the torch reference)."""
    from common.lowp import get_format
    from common.lowp.spec import block_sums_exact
    from common.lowp.triton_kernels import emulated_matmul_triton

    fp32 = get_format("fp32")
    a = torch.tensor([[1, 2**-12, 2**-7 * (1 + 2**-23), 2**-7]], dtype=torch.float64)
    b = torch.tensor([[1], [2**-12], [-(2**-7) * (1 - 2**-23)], [2**-7]], dtype=torch.float64)
    assert not block_sums_exact(a, b, fp32, 4)
    assert emulated_matmul_triton(a, b, fp32, fp32, fp32, block_k=4).item() == 1.0
    assert emulated_matmul(a, b, "fp32", "fp32", "fp32", block_k=4, backend="triton").item() == 1 + 2**-23


def test_gpu_check_quantize_bandwidth_rows_on_cpu(tmp_path, monkeypatch):
    """gpu_check's quantize-bandwidth part, run on the CPU interpreter with a call-counting timer: the
    Triton kernel is bit-identical to torch's native cast round trip for each native format (an independent
    rounding), and every ratio is the quotient of the logged times."""
    from common.lowp.gpu_check import NATIVE_CASTS, bench_quantize
    from common.results import Run, read_run, run_dirs

    monkeypatch.setenv("LLM4ALL_RESULTS", str(tmp_path))
    times = iter(range(1, 100))
    calls = []

    def timer(fn):
        calls.append(fn())   # run it: a timer that never calls fn would hide a broken kernel
        return float(next(times))

    run = Run("lowp", config={}, seed=0, profile="test")
    bench_quantize(run, 4096, device="cpu", timer=timer)
    run.finish()
    rows = read_run(run_dirs(tmp_path)[0])[1]
    same = {r["params"]["format"]: r["value"] for r in rows if r["metric"] == "bit_identical_to_cast"}
    assert same == {f: 1.0 for f in NATIVE_CASTS}
    gb = {(r["method"], r["params"].get("format"), r["params"].get("mode")): r["value"] for r in rows
          if r["metric"] == "gb_per_s"}
    copy = gb[("torch_clone", None, None)]
    for r in rows:
        if r["metric"] == "ratio":   # copy time / ours = ours GB/s / copy GB/s
            p = r["params"]
            assert r["value"] == pytest.approx(gb[("triton_quantize", p["format"], p["mode"])] / copy)
    assert ("triton_quantize", "bf16", "stochastic") in gb and len(calls) == 1 + 2 * len(NATIVE_CASTS) + 1

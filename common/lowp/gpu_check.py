"""GPU checks and benchmarks for common.lowp (needs CUDA; run on a lent GPU machine).

    python -m common.lowp.gpu_check [--sizes 1024 4096] [--skip-bench] [--results-dir DIR]

1. the @pytest.mark.gpu tests (tests/lowp/test_lowp_native.py): native kernels vs float64 with
   format-appropriate bounds, Triton emulation on CUDA == the torch reference;
2. native_matmul vs torch.matmul (bf16, fp16) and vs torch._scaled_mm (fp8 e4m3fn, precise and fast
   accumulation): time (triton.testing.do_bench, median ms), TFLOP/s, ratio to the peer;
3. the Hopper fp8 accumulator model: outputs of fast-accumulation fp8 GEMMs (Triton default, cuBLASLt
   use_fast_accum) vs ``emulated_matmul(in=fp8, acc=(8, 13), mode="rz", block_k=b)`` for several b, and
   vs fp32 accumulation: fraction of bit-identical outputs and median relative difference;
4. quantize bandwidth: the Triton quantize kernel (float32 -> a format's values in float32) vs torch's native
   cast round trip (``x.to(bf16).float()``: the same function on in-range inputs, checked bit-identical in the
   same call) and vs a plain device copy (the memory-bound ceiling): GB/s at 8 bytes per element, ratios.
Rows go to the results table (experiment "lowp"). Exits 3 with a message when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from common.lowp import emulated_matmul, get_format
from common.lowp.native import native_matmul, native_matmul_reference, to_fp8
from common.paths import REPO_ROOT
from common.results import Run


def run_gpu_tests() -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(REPO_ROOT / "tests/lowp/test_lowp_native.py")]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO_ROOT).returncode


def bench_native(run: Run, sizes: list[int]) -> None:
    from triton.testing import do_bench

    print("\nnative matmul (median ms, TFLOP/s); ratio = peer time / ours")
    for n in sizes:
        flops = 2 * n**3
        g = torch.Generator(device="cuda").manual_seed(n)
        x = torch.randn(n, n, device="cuda", generator=g)
        y = torch.randn(n, n, device="cuda", generator=g)
        for dtype in (torch.bfloat16, torch.float16):
            a, b = x.to(dtype), y.to(dtype)
            ours = do_bench(partial(native_matmul, a, b))
            peer = do_bench(partial(torch.matmul, a, b))
            _log_pair(run, n, str(dtype).split(".")[-1], "torch.matmul", ours, peer, flops)
        if torch.cuda.get_device_capability() >= (8, 9):
            a, sa = to_fp8(x)
            b, sb = to_fp8(y)
            bt = b.t().contiguous().t()  # column-major right operand: what _scaled_mm wants, K-major for wgmma
            for fast in (False, True):
                peer = do_bench(partial(torch._scaled_mm, a, bt, sa, sb, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast))
                ours = do_bench(partial(native_matmul, a, bt, sa, sb, max_num_imprecise_acc=None if fast else 0))
                _log_pair(run, n, f"fp8_e4m3fn_{'fast' if fast else 'precise'}", "torch._scaled_mm", ours, peer,
                          flops)


def _log_pair(run: Run, n: int, dtype: str, peer_name: str, ours_ms: float, peer_ms: float, flops: int) -> None:
    params = {"M": n, "N": n, "K": n, "dtype": dtype}
    run.log(table="native_matmul_bench", method="triton_native", metric="ms", value=ours_ms, params=params)
    run.log(table="native_matmul_bench", method=peer_name, metric="ms", value=peer_ms, params=params)
    run.log(table="native_matmul_bench", method=f"triton_native_vs_{peer_name}", metric="speedup",
            value=peer_ms / ours_ms, params=params)
    print(f"  n={n:5d} {dtype:20s} ours {ours_ms:8.3f} ms ({flops / ours_ms / 1e9:7.1f} TF/s)  {peer_name} "
          f"{peer_ms:8.3f} ms ({flops / peer_ms / 1e9:7.1f} TF/s)  ratio {peer_ms / ours_ms:5.2f}")


def accumulation_model(run: Run, m: int = 256, n: int = 256, k: int = 4096) -> None:
    """Which emulated accumulator reproduces the hardware's fast fp8 accumulation?"""
    if torch.cuda.get_device_capability() < (8, 9):
        print("\n(no fp8 tensor cores: accumulation-model check skipped)")
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    a, sa = to_fp8(torch.rand(m, k, device="cuda", generator=g))  # positive: long sums, errors accumulate
    b, sb = to_fp8(torch.rand(k, n, device="cuda", generator=g))
    af, bf = a.float(), b.float()  # exact fp8 values; unscaled so the emulation sees the same products
    hardware = {
        "triton_fast": native_matmul(a, b, out_dtype=torch.float32),
        "triton_precise": native_matmul(a, b, out_dtype=torch.float32, max_num_imprecise_acc=0),
        "scaled_mm_fast": torch._scaled_mm(a, b.t().contiguous().t(), torch.tensor(1.0, device="cuda"),
                                           torch.tensor(1.0, device="cuda"), out_dtype=torch.float32,
                                           use_fast_accum=True),
        "scaled_mm_precise": torch._scaled_mm(a, b.t().contiguous().t(), torch.tensor(1.0, device="cuda"),
                                              torch.tensor(1.0, device="cuda"), out_dtype=torch.float32,
                                              use_fast_accum=False),
    }
    exact = native_matmul_reference(a, b, out_dtype=torch.float64)
    models = {f"e8m13_rz_k{bk}": ("fp22_e8m13", "rz", bk) for bk in (1, 4, 8, 16, 32, 64, 128)}
    models["fp32_rne_k1"] = ("fp32", "rne", 1)
    models["fp32_rne_k32"] = ("fp32", "rne", 32)
    print(f"\nfp8 accumulation model, M={m} N={n} K={k}, positive inputs: share of bit-identical outputs "
          "(median |hw - model| / |exact|)")
    emulated = {name: emulated_matmul(af, bf, "fp8_e4m3fn", acc, "fp32", block_k=bk, mode=mode, backend="triton")
                for name, (acc, mode, bk) in models.items()}
    for hw_name, hw in hardware.items():
        hw_err = ((hw.double() - exact).abs() / exact.abs()).median().item()
        run.log(table="fp8_accumulation_model", method=hw_name, metric="median_rel_error_vs_exact",
                value=hw_err, params={"M": m, "N": n, "K": k})
        cells = []
        for name, em in emulated.items():
            same = (hw == em).double().mean().item()
            diff = ((hw.double() - em.double()).abs() / exact.abs()).median().item()
            run.log(table="fp8_accumulation_model", method=hw_name, metric="share_identical", value=same,
                    params={"model": name, "M": m, "N": n, "K": k})
            run.log(table="fp8_accumulation_model", method=hw_name, metric="median_rel_diff", value=diff,
                    params={"model": name, "M": m, "N": n, "K": k})
            cells.append(f"{name}: {same:.3f} ({diff:.1e})")
        print(f"  {hw_name:18s} err vs exact {hw_err:.2e} | " + "  ".join(cells))


NATIVE_CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn,
                "fp8_e5m2": torch.float8_e5m2}


def _cast_round_trip(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(torch.float32)


def bench_quantize(run: Run, numel: int, device: str = "cuda",
                   timer: Callable[[Callable[[], object]], float] | None = None) -> None:
    """Quantize bandwidth on ``device`` (``timer(fn)`` -> median ms; default triton's do_bench). Inputs are
    N(0, 10^2) float32, inside every listed format's range, so the native cast is the same rounding (no
    overflow rule involved); stochastic rounding (bf16) has no native peer and is compared with the copy only
    (its time includes drawing the random bits)."""
    from common.lowp.triton_kernels import quantize_triton

    if timer is None:
        from triton.testing import do_bench as timer
    g = torch.Generator(device=device).manual_seed(numel)
    x = torch.randn(numel, device=device, generator=g) * 10

    def gbs(ms: float) -> float:
        return 8 * numel / ms / 1e6   # 4 bytes read + 4 written per element; ms -> GB/s
    copy_ms = timer(partial(torch.clone, x))
    params = {"numel": numel}
    run.log(table="quantize_bandwidth", method="torch_clone", metric="gb_per_s", value=gbs(copy_ms), params=params)
    print(f"\nquantize bandwidth, {numel} float32 elements (GB/s at 8 B/element); copy {gbs(copy_ms):.0f} GB/s")
    cases = [(name, "rne", dtype) for name, dtype in NATIVE_CASTS.items()] + [("bf16", "stochastic", None)]
    for fmt, mode, dtype in cases:
        p = {**params, "format": fmt, "mode": mode}
        gen = torch.Generator(device=device).manual_seed(0)
        ours = partial(quantize_triton, x, get_format(fmt), mode, gen if mode == "stochastic" else None)
        ours_ms = timer(ours)
        run.log(table="quantize_bandwidth", method="triton_quantize", metric="gb_per_s", value=gbs(ours_ms),
                params=p)
        run.log(table="quantize_bandwidth", method="triton_quantize_vs_torch_clone", metric="ratio",
                value=copy_ms / ours_ms, params=p)
        line = f"  {fmt:11s} {mode:10s} ours {gbs(ours_ms):8.1f} GB/s ({copy_ms / ours_ms:4.2f} of copy)"
        if dtype is not None:
            native = partial(_cast_round_trip, x, dtype)
            same = torch.equal(ours(), native())   # no NaN: the inputs are finite and in range
            native_ms = timer(native)
            run.log(table="quantize_bandwidth", method="torch_cast_round_trip", metric="gb_per_s",
                    value=gbs(native_ms), params=p)
            run.log(table="quantize_bandwidth", method="triton_quantize_vs_torch_cast_round_trip",
                    metric="speedup", value=native_ms / ours_ms, params=p)
            run.log(table="quantize_bandwidth", method="triton_quantize", metric="bit_identical_to_cast",
                    value=float(same), params=p)
            line += f"  cast round trip {gbs(native_ms):8.1f} GB/s  speedup {native_ms / ours_ms:4.2f}  " \
                    f"identical {same}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--quantize-numel", type=int, nargs="+", default=[1 << 24, 1 << 28])
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check (the CPU tests are in tests/lowp)", file=sys.stderr)
        return 3
    if args.results_dir:
        os.environ["LLM4ALL_RESULTS"] = str(Path(args.results_dir).resolve())
    print(f"device: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability()}, "
          f"torch {torch.__version__}")
    rc = 0 if args.skip_tests else run_gpu_tests()
    run = Run("lowp", config=vars(args), seed=0, profile="gpu_check")
    accumulation_model(run)
    if not args.skip_bench:
        bench_native(run, args.sizes)
        for numel in args.quantize_numel:
            bench_quantize(run, numel)
    print(f"\nresults: {run.finish()}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

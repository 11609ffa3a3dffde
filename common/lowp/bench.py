"""CPU benchmarks of common.lowp; appends rows to the results table (experiment "lowp").

    python -m common.lowp.bench --profile quick [threads=1]

1. quantize throughput (elements/s, float32 input) of ``quantize`` (auto = what users get: the numba kernels
   on CPU unless LLM4ALL_NO_NUMBA=1; numba = that backend always; torch-int = the integer-bit torch path)
   against its peers: the ml_dtypes cast (float32 -> format, one way; the round trip back to float32 is
   reported as well) and a naive PyTorch rounding (frexp/ldexp/round), ratios printed.
2. emulated-matmul overhead: ``emulated_matmul`` (torch reference) time / fp32 ``torch.matmul`` time.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from common.config import parse_config
from common.lowp import emulated_matmul, get_format, quantize
from common.lowp.formats import FloatFormat
from common.lowp.quantize import auto_backend
from common.results import Run

_HAVE_NUMBA = importlib.util.find_spec("numba") is not None

ML_DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp8_e4m3fn": ml_dtypes.float8_e4m3fn,
             "fp8_e5m2": ml_dtypes.float8_e5m2, "fp6_e3m2": ml_dtypes.float6_e3m2fn,
             "fp6_e2m3": ml_dtypes.float6_e2m3fn, "fp4_e2m1": ml_dtypes.float4_e2m1fn}
MATMUL_CASES = [  # name, in, acc, out, block_k, mode
    ("bf16-acc-fp32-k1", "bf16", "fp32", "fp32", 1, "rne"),
    ("fp16-acc-fp16-k1", "fp16", "fp16", "fp16", 1, "rne"),
    ("bf16-acc-bf16-k32", "bf16", "bf16", "bf16", 32, "rne"),
    ("fp8-acc-e8m13rz-k32", "fp8_e4m3fn", "fp22_e8m13", "bf16", 32, "rz"),
]


@dataclass
class BenchConfig:
    seed: int = 0
    threads: int = 0  # 0: torch's default
    n_elements: int = 1 << 22
    repeats: int = 3
    formats: list[str] = field(default_factory=lambda: ["bf16", "fp8_e4m3fn"])
    modes: list[str] = field(default_factory=lambda: ["rne"])
    matmul_shapes: list[list[int]] = field(default_factory=lambda: [[64, 64, 256]])

    def validate(self) -> None:
        for f in self.formats:
            get_format(f)
        if any(len(s) != 3 for s in self.matmul_shapes):
            raise ValueError(f"matmul_shapes entries must be [M, N, K], got {self.matmul_shapes}")


def naive_quantize(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The obvious arithmetic version: ulp from frexp, torch.round (half to even), clamp to max/inf."""
    _, e = torch.frexp(x)
    ulp = torch.ldexp(torch.ones_like(x), (e - 1).clamp_min(fmt.emin) - fmt.man_bits)
    y = torch.round(x / ulp) * ulp
    over = float("inf") if fmt.overflow == "inf" else fmt.max_normal
    return torch.where(y.abs() > fmt.max_normal, torch.copysign(torch.full_like(y, over), y), y)


def _roundtrip(x: np.ndarray, dtype) -> np.ndarray:
    return x.astype(dtype).astype(np.float32)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _quantize_rates(x: torch.Tensor, fmt: FloatFormat, mode: str, cfg: BenchConfig) -> dict[str, float]:
    """Elements/s of each method; stochastic runs draw from a fixed-seed generator (same bits per backend)."""
    n = x.numel()
    gen = torch.Generator().manual_seed(cfg.seed)
    rate = {}
    for method, backend in (("auto", "auto"), ("numba", "numba"), ("torch-int", "torch")):
        if backend == "numba" and not _HAVE_NUMBA:
            continue
        rate[method] = n / best_time(partial(quantize, x, fmt, mode, generator=gen, backend=backend), cfg.repeats)
    if mode == "rne":
        rate["naive"] = n / best_time(partial(naive_quantize, x, fmt), cfg.repeats)
        peer = ML_DTYPES.get(fmt.name)
        if peer is not None:
            xn = x.numpy()
            with np.errstate(all="ignore"):
                rate["ml_dtypes"] = n / best_time(partial(xn.astype, peer), cfg.repeats)
                rate["ml_dtypes_roundtrip"] = n / best_time(partial(_roundtrip, xn, peer), cfg.repeats)
    return rate


def bench_quantize(cfg: BenchConfig, run: Run) -> None:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n_elements, generator=g)
    n, threads = cfg.n_elements, torch.get_num_threads()
    print(f"\nquantize throughput, {n} float32 elements, {threads} torch threads (M elem/s); "
          f"auto = {auto_backend(x)}")
    print(f"{'format':12s} {'mode':10s} {'auto':>8s} {'numba':>8s} {'torch-int':>10s} {'naive':>8s} "
          f"{'ml_dtypes':>10s} {'ml_rt':>8s} {'auto/ml_dtypes':>15s} {'auto/naive':>11s}")
    for name in cfg.formats:
        fmt = get_format(name)
        for mode in cfg.modes:
            rate = _quantize_rates(x, fmt, mode, cfg)
            params = {"format": name, "mode": mode, "threads": threads, "auto_backend": auto_backend(x)}
            for method, r in rate.items():
                run.log(table="quantize_throughput", method=method, metric="elements_per_s", value=r, n=n,
                        params=params)
            ratios = {}
            for ours, peer_name in (("auto", "ml_dtypes"), ("numba", "ml_dtypes"), ("auto", "naive")):
                if ours in rate and peer_name in rate:
                    ratios[ours, peer_name] = rate[ours] / rate[peer_name]
                    run.log(table="quantize_throughput", method=f"{ours}_vs_{peer_name}", metric="speedup",
                            value=ratios[ours, peer_name], n=n, params=params)
            fmt_r = {k: f"{v / 1e6:8.1f}" for k, v in rate.items()}
            print(f"{name:12s} {mode:10s} {fmt_r['auto']:>8s} {fmt_r.get('numba', '-'):>8s} "
                  f"{fmt_r['torch-int']:>10s} {fmt_r.get('naive', '-'):>8s} {fmt_r.get('ml_dtypes', '-'):>10s} "
                  f"{fmt_r.get('ml_dtypes_roundtrip', '-'):>8s} "
                  f"{ratios.get(('auto', 'ml_dtypes'), float('nan')):15.2f} "
                  f"{ratios.get(('auto', 'naive'), float('nan')):11.2f}")


def bench_matmul(cfg: BenchConfig, run: Run) -> None:
    print("\nemulated matmul (torch reference, CPU) vs fp32 torch.matmul")
    print(f"{'case':22s} {'M,N,K':>14s} {'emulated s':>11s} {'fp32 s':>10s} {'slowdown':>9s}")
    g = torch.Generator().manual_seed(cfg.seed)
    for m, n, k in cfg.matmul_shapes:
        a = torch.randn(m, k, generator=g)
        b = torch.randn(k, n, generator=g)
        t32 = best_time(partial(torch.matmul, a, b), max(cfg.repeats, 10))
        for name, fin, facc, fout, bk, mode in MATMUL_CASES:
            t = best_time(partial(emulated_matmul, a, b, fin, facc, fout, block_k=bk, mode=mode), cfg.repeats)
            params = {"case": name, "M": m, "N": n, "K": k, "block_k": bk, "threads": torch.get_num_threads()}
            run.log(table="emulated_matmul_overhead", method="emulated_torch", metric="seconds", value=t,
                    params=params)
            run.log(table="emulated_matmul_overhead", method="torch_matmul_fp32", metric="seconds", value=t32,
                    params=params)
            run.log(table="emulated_matmul_overhead", method="emulated_torch", metric="slowdown_vs_fp32",
                    value=t / t32, params=params)
            print(f"{name:22s} {f'{m},{n},{k}':>14s} {t:11.4f} {t32:10.6f} {t / t32:9.0f}x")


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_config(BenchConfig, config_dir=Path(__file__).parent / "configs", argv=argv,
                             description=__doc__.splitlines()[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Run("lowp", config=cfg, seed=cfg.seed, profile=args.profile_name)
    bench_quantize(cfg, run)
    bench_matmul(cfg, run)
    print(f"\nresults: {run.finish()}")


if __name__ == "__main__":
    main()

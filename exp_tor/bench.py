"""Simulator throughput: failure cycles/s of the vectorised simulator vs a per-event Python loop (same model).

    python exp_tor/bench.py [--cycles 4000000] [--loop-cycles 100000]
"""

from __future__ import annotations

import argparse
import time

from common.results import Run
from exp_tor import simulate as sim

PARAMS = {"tau": 30.0, "delta": 1.0, "repair": 10.0, "mtbf": 180.0}


def rate(fn, n: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycles", type=int, default=4_000_000)
    ap.add_argument("--loop-cycles", type=int, default=100_000)
    args = ap.parse_args(argv)
    p = PARAMS
    vec = rate(lambda n: sim.simulate_fail_stop(p["tau"], p["delta"], p["repair"], p["mtbf"], n, seed=0),
               args.cycles)
    loop = rate(lambda n: sim.loop_fail_stop_cycles(p["tau"], p["delta"], p["repair"], p["mtbf"], n, seed=0),
                args.loop_cycles, repeats=1)
    print(f"vectorised simulator: {vec:,.0f} failure cycles/s")
    print(f"per-event Python loop (peer): {loop:,.0f} failure cycles/s")
    print(f"speed-up: {vec / loop:.1f}x")
    run = Run("exp_tor", config={"bench": vars(args), **p}, seed=0, profile="bench")
    run.log(table="tor_bench", method="vectorised", metric="cycles_per_s", value=vec, n=args.cycles, params=p)
    run.log(table="tor_bench", method="python_loop", metric="cycles_per_s", value=loop, n=args.loop_cycles, params=p)
    run.log(table="tor_bench", method="vectorised_vs_python_loop", metric="speedup", value=vec / loop, params=p)
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

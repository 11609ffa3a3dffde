"""A three-stage toy experiment for tests/test_stages.py: numbers -> squares (slow, killable) -> total.

    python tests/helpers/toy_stages.py [--stage ...] [n=..] [pause=..] [--force]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.stages import Stage, StageContext, run_experiment

STAGE_NAMES = ["numbers", "squares", "total"]


@dataclass
class Config:
    seed: int = 0
    n: int = 6
    pause: float = 0.0          # seconds per square: lets a test SIGKILL the run midway
    label: str = "toy"          # only the total stage depends on it
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES))
    outputs_dir: str = ""


def numbers(ctx: StageContext) -> None:
    vals = [ctx.cfg.seed + i for i in range(ctx.cfg.n)]
    ctx.save_json("numbers.json", vals)
    ctx.log(table="toy", method="numbers", metric="count", value=len(vals))


def squares(ctx: StageContext) -> None:
    vals = ctx.load_json("numbers", "numbers.json")
    out = []
    for v in vals:
        out.append(v * v)
        ctx.save_json("progress.json", out)  # partial work a kill leaves in the partial folder
        print(f"square {len(out)}/{len(vals)}", flush=True)
        time.sleep(ctx.cfg.pause)
    ctx.save_json("squares.json", out)
    ctx.log(table="toy", method="squares", metric="max", value=max(out))


def total(ctx: StageContext) -> None:
    sq = ctx.load_json("squares", "squares.json")
    ctx.save_json("total.json", {"label": ctx.cfg.label, "total": sum(sq)})
    ctx.log(table="toy", method="total", metric="sum", value=sum(sq), params={"label": ctx.cfg.label})


STAGES = [Stage("numbers", numbers, config_keys=("seed", "n")),
          Stage("squares", squares, inputs=("numbers",)),
          Stage("total", total, config_keys=("label",), inputs=("squares",))]

if __name__ == "__main__":
    from pathlib import Path

    raise SystemExit(run_experiment("toy_stages", Config, STAGES, doc=__doc__,
                                    config_dir=Path(__file__).parent / "toy_configs"))

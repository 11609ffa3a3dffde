"""An extra worker for the curriculum study's training runs: more cores, more runs at a time.

The study's runs are independent (one small model each), so on a machine with spare cores the fastest
way through them is several single-process trainers, not one data-parallel one. Start the study as usual
and, beside it, one worker per spare core with the *same* profile and overrides:

    python exp_curriculum/run.py --profile small threads=1 &                 # the study (then its table)
    taskset -c 1 python exp_curriculum/study_worker.py --profile small threads=1 --reverse

A worker trains runs missing from the study's run cache (claiming each one first, so that no run is
trained twice) and writes only there: no stage folder, no results rows. The stage ``study_train`` picks
the finished runs up from the cache, waits for runs a live worker holds, and logs everything as if it had
trained it alone; runs are deterministic per (config, seed), so who trained a run does not change it.
The inputs (study_data, study_reference, study_select) must be complete. ``--reverse`` walks the job list
from its end (useful beside a study process that does not claim runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.config import parse_config, to_dict
from common.stages import Pipeline, StageContext, StageInputError, build_parser

INPUTS = ("study_data", "study_reference", "study_select")


def main(argv: list[str] | None = None) -> int:
    import torch

    from common.train import make_accelerator
    from exp_curriculum import run as run_mod
    from exp_curriculum import study as st
    from exp_curriculum.config import Config
    from exp_curriculum.study_stages import run_cache, train_jobs

    pipeline = Pipeline(run_mod.EXP, run_mod.STAGES)
    parser = build_parser(__doc__, pipeline.names)
    parser.add_argument("--reverse", action="store_true", help="train from the end of the job list")
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_config(Config, config_dir=Path(run_mod.__file__).parent / "configs", argv=argv,
                             parser=parser)
    cfg_dict = to_dict(cfg)
    inputs = {}
    for name in INPUTS:
        d = pipeline.stage_dir(name, cfg, cfg_dict)
        inputs[name] = d if pipeline.is_complete(d) else None
    missing = [n for n in ("study_data", "study_reference") if inputs[n] is None]
    if missing:
        print(f"error: stage(s) {missing} not complete for this config: run exp_curriculum/run.py with the same "
              "profile and overrides first", file=sys.stderr)
        return 2
    stage = next(s for s in run_mod.STAGES if s.name == "study_train")
    out_dir = pipeline.stage_dir("study_train", cfg, cfg_dict)      # read-only here: only its parents are used
    ctx = StageContext(stage=stage, cfg=cfg, run=None, out_dir=out_dir, input_dirs=inputs)
    torch.set_num_threads(cfg.threads)
    try:
        cache = run_cache(ctx)
        accelerator = make_accelerator(st.train_config(cfg.study, "constant", 0, 1, cache), out_dir=cache)
        train_jobs(ctx, cache, accelerator, folder=None, reverse=args.reverse)
    except StageInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"study_worker: every run of this study is in {cache.name} or held by another process")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stages on disk: the one entry point of every ``exp_*/run.py``.

An experiment is a list of stages (LESS-style: warm-up -> features -> selection -> training). Each stage
writes into its own folder

    <outputs root>/<experiment>/<stage>/<hash>/

where ``<hash>`` covers only the config keys that stage depends on, the hashes of its input stages and
the stage's code version. The folder is built under ``.partial-<hash>/`` and renamed into place with a
``COMPLETE.json`` once the stage has finished, so a folder that exists is complete. Hence:

* a stage whose folder is complete is skipped (``--force`` reruns it);
* a stage killed midway restarts cleanly (its partial folder is wiped, or kept for ``resumable`` stages
  that continue from their own checkpoints there);
* a later stage run alone in a fresh process (``--stage guidelines``) reads its inputs from disk, and
  runs the missing upstream stages first when the current config has no output for them yet.

A stage's rows for the results table are buffered while it runs, saved with its outputs
(``rows.jsonl``) and logged to the run when the stage completes, so a killed stage never leaves half a
table behind.

    STAGES = [Stage("data", make_data, config_keys=("seed", "data")),
              Stage("train", train_model, config_keys=("seed", "train"), inputs=("data",))]

    def make_data(ctx: StageContext) -> None:
        ctx.save_json("data.json", ...)
        ctx.log(table="t", method="m", metric="n", value=3)

    def train_model(ctx: StageContext) -> None:
        data = ctx.load_json("data", "data.json")

    if __name__ == "__main__":
        raise SystemExit(run_experiment("exp_x", Config, STAGES, doc=__doc__))

Command line (every experiment): ``--profile``, dotted overrides, ``stages=[a,b]`` or its alias
``--stage a,b``, ``--force``, ``--outputs-dir`` (or ``$LLM4ALL_OUTPUTS``, or the config key
``outputs_dir``), ``--show-config``, ``--list-stages``, ``--data-dir``, ``--results-dir``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import paths
from common.config import EXIT_CONFIG_ERROR, ConfigError, make_parser, parse_config, to_dict, to_yaml
from common.results import is_main_process, jsonable

COMPLETE = "COMPLETE.json"
LOGGED = "LOGGED.json"
ROWS = "rows.jsonl"
PARTIAL_PREFIX = ".partial-"


class StageInputError(RuntimeError):
    """A stage asked for an input that is not on disk for the current config."""


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux >= 4.0: ``5`` into clear_refs), so that
    the next ``peak_rss_mib`` is one stage's peak, not the whole process's; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    """VmHWM of this process in MiB (the peak resident set since start or the last ``reset_peak_rss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class Stage:
    """One stage of an experiment.

    ``config_keys``: dotted config keys (``"seed"``, ``"train"``, ``"data.pool"``) whose values the output
    depends on; nothing else enters the folder's hash. ``inputs``: earlier stages whose outputs it reads
    (run first when missing). ``optional_inputs``: read when complete, never run for it.
    ``cache=False``: a cheap summary stage that always reruns. ``resumable``: keep the partial folder
    across a kill, for stages that resume from checkpoints they keep there. Bump ``version`` when a code
    change makes old outputs wrong.
    """

    name: str
    fn: Callable[[StageContext], Any]
    config_keys: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    optional_inputs: tuple[str, ...] = ()
    cache: bool = True
    resumable: bool = False
    version: str = "1"
    description: str = ""


def _canonical(obj: Any) -> str:
    return json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"))


def select_keys(cfg_dict: dict, keys: Sequence[str]) -> dict:
    """The values of dotted ``keys`` in a config dict; an unknown key is a programming error."""
    out = {}
    for key in keys:
        node: Any = cfg_dict
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"stage config key '{key}' is not a key of the experiment's config")
            node = node[part]
        out[key] = node
    return out


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _World:
    """Rank and barrier. A multi-process launch (WORLD_SIZE > 1) joins accelerate's process group so that
    only the main process moves folders while the others wait."""

    def __init__(self) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self._state = None
        if self.size > 1:
            import torch
            from accelerate import PartialState

            self._state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def is_main(self) -> bool:
        return self._state.is_main_process if self._state is not None else True

    @property
    def rank(self) -> int:
        return self._state.process_index if self._state is not None else 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()


@dataclass
class StageContext:
    """What a stage function gets: the config, the run, its output folder and its inputs' folders.

    In a multi-process launch every process runs the stage function: ``rank`` / ``world_size`` say which
    one this is, ``shard(jobs)`` is this process's share of independent jobs, ``barrier()`` waits for the
    others, and ``save_json`` writes from the main process only. Rows are logged from the main process's
    ``log`` calls only.
    """

    stage: Stage
    cfg: Any
    run: Any                      # common.results.Run
    out_dir: Path                 # write outputs here (the partial folder while the stage runs)
    input_dirs: dict[str, Path | None]
    is_main: bool = True
    rows: list[dict] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None

    def shard(self, jobs: Sequence[Any]) -> list[Any]:
        """This process's jobs: every world_size-th one, from its rank on."""
        return list(jobs[self.rank::self.world_size])

    def log(self, table: str, method: str, metric: str, value: float, **kw: Any) -> None:
        """A results-table row (``common.results.Run.log``'s arguments), logged when the stage completes."""
        if not (isinstance(value, (int, float)) or hasattr(value, "item")):
            raise TypeError(f"value for {table}/{method}/{metric} must be a number, got {type(value).__name__}")
        self.rows.append(jsonable({"table": table, "method": method, "metric": metric, "value": value, **kw}))

    def input(self, name: str) -> Path:
        """The completed output folder of input stage ``name`` for the current config."""
        d = self.input_dirs.get(name)
        if d is None:
            raise StageInputError(f"stage '{self.stage.name}' needs the output of stage '{name}', which is not "
                                  f"complete for this config: run it with --stage {name}")
        return d

    def has_input(self, name: str) -> bool:
        return self.input_dirs.get(name) is not None

    def path(self, name: str) -> Path:
        """A file in this stage's output folder (parents created)."""
        p = self.out_dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def save_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as JSON into this stage's folder (main process only; every process gets the path)."""
        p = self.out_dir / name
        if self.is_main:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(jsonable(obj), indent=1, sort_keys=True), encoding="utf-8")
        return p

    def load_json(self, stage: str, name: str) -> Any:
        """A JSON file written by input stage ``stage``."""
        p = self.input(stage) / name
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise StageInputError(f"cannot read {paths.repo_relative(p)} (output of stage '{stage}'): {exc}. "
                                  f"Rerun it with --stage {stage} --force") from None


class Pipeline:
    """The stages of one experiment, their folders and the logic that runs or skips them."""

    def __init__(self, experiment: str, stages: Sequence[Stage]) -> None:
        self.experiment = experiment
        self.stages = {s.name: s for s in stages}
        if len(self.stages) != len(stages):
            raise ValueError(f"{experiment}: duplicate stage names in {[s.name for s in stages]}")
        seen: set[str] = set()
        for s in stages:  # inputs must come earlier: the declaration order is a valid run order
            missing = [i for i in (*s.inputs, *s.optional_inputs) if i not in seen]
            if missing:
                raise ValueError(f"{experiment}: stage '{s.name}' reads {missing}, which are not declared before it")
            seen.add(s.name)

    @property
    def names(self) -> list[str]:
        return list(self.stages)

    # ------------------------------------------------------------------ folders and hashes
    def root(self, cfg: Any) -> Path:
        configured = str(getattr(cfg, "outputs_dir", "") or "")
        base = Path(configured).expanduser() if configured else paths.outputs_dir()
        if not base.is_absolute():
            base = paths.REPO_ROOT / base
        return base / self.experiment

    def spec(self, name: str, cfg_dict: dict) -> dict:
        """What the stage's output depends on: its config parts, its inputs' hashes and its version."""
        st = self.stages[name]
        return {"experiment": self.experiment, "stage": name, "version": st.version,
                "config": select_keys(cfg_dict, st.config_keys),
                "inputs": {i: self.key(i, cfg_dict) for i in (*st.inputs, *st.optional_inputs)}}

    def key(self, name: str, cfg_dict: dict) -> str:
        return hashlib.sha256(_canonical(self.spec(name, cfg_dict)).encode()).hexdigest()[:12]

    def stage_dir(self, name: str, cfg: Any, cfg_dict: dict | None = None) -> Path:
        cfg_dict = to_dict(cfg) if cfg_dict is None else cfg_dict
        return self.root(cfg) / name / self.key(name, cfg_dict)

    @staticmethod
    def is_complete(folder: Path) -> bool:
        return (folder / COMPLETE).is_file()

    # ------------------------------------------------------------------ running
    def plan(self, cfg: Any, selected: Sequence[str], force: bool) -> list[tuple[str, str]]:
        """(stage, why) in run order: the selected stages plus missing inputs of those that will run."""
        cfg_dict = to_dict(cfg)
        wanted = set(selected)
        for name in reversed(self.names):  # reverse declaration order reaches inputs of inputs
            if name not in wanted:
                continue
            st = self.stages[name]
            if not self._will_run(name, cfg, cfg_dict, force):
                continue
            for i in st.inputs:
                if i not in wanted and not self.is_complete(self.stage_dir(i, cfg, cfg_dict)):
                    wanted.add(i)
        out = []
        for name in self.names:
            if name in wanted:
                why = "selected" if name in selected else "input of a selected stage, missing for this config"
                out.append((name, why))
        return out

    def _will_run(self, name: str, cfg: Any, cfg_dict: dict, force: bool) -> bool:
        st = self.stages[name]
        return force or not st.cache or not self.is_complete(self.stage_dir(name, cfg, cfg_dict))

    def run(self, cfg: Any, run: Any, selected: Sequence[str], force: bool = False,
            log: Callable[[str], None] = print) -> dict[str, dict]:
        """Run (or skip) ``selected`` stages and their missing inputs; returns per-stage status and time."""
        world = _World()
        if not world.is_main:  # one progress line per stage, from the main process
            def log(_: str) -> None:
                return None
        cfg_dict = to_dict(cfg)
        report: dict[str, dict] = {}
        plan = self.plan(cfg, selected, force)
        for k, (name, why) in enumerate(plan, 1):
            st = self.stages[name]
            final = self.stage_dir(name, cfg, cfg_dict)
            rel = str(final.relative_to(self.root(cfg).parent))   # <experiment>/<stage>/<hash>: no machine path
            shown = paths.repo_relative(final) if final.is_relative_to(paths.REPO_ROOT) else str(final)
            prefix = f"[{self.experiment}] stage {k}/{len(plan)} {name}"
            if not (force and name in selected) and st.cache and self.is_complete(final):
                if world.is_main:
                    self._log_rows_once(final, run)
                log(f"{prefix}: skipped, complete in {shown} (--force reruns it)")
                report[name] = {"status": "skipped", "dir": rel, "seconds": 0.0}
                continue
            if why != "selected":
                log(f"{prefix}: {why}: running it")
            else:
                log(f"{prefix}: running -> {shown}")
            peak_known = reset_peak_rss()
            t0 = time.perf_counter()
            self._run_one(st, cfg, cfg_dict, run, final, world)
            seconds = time.perf_counter() - t0
            peak = peak_rss_mib() if peak_known else None
            log(f"{prefix}: done in {seconds:.1f} s" + (f", peak RSS {peak:.0f} MiB" if peak else ""))
            report[name] = {"status": "ran", "dir": rel, "seconds": round(seconds, 3)}
            if peak:
                report[name]["peak_rss_mib"] = round(peak, 1)
            if world.is_main:
                run.log(table="stage_time", method=name, metric="seconds", value=seconds)
                if peak:  # the main process's own high-water mark during this stage
                    run.log(table="stage_time", method=name, metric="peak_rss_mib", value=peak)
        return report

    def _input_dirs(self, st: Stage, cfg: Any, cfg_dict: dict) -> dict[str, Path | None]:
        out: dict[str, Path | None] = {}
        for i in (*st.inputs, *st.optional_inputs):
            d = self.stage_dir(i, cfg, cfg_dict)
            out[i] = d if self.is_complete(d) else None
        return out

    def _run_one(self, st: Stage, cfg: Any, cfg_dict: dict, run: Any, final: Path, world: _World) -> None:
        partial = final.parent / f"{PARTIAL_PREFIX}{final.name}"
        if world.is_main:
            if partial.exists() and not st.resumable:  # left by a killed attempt: start clean
                shutil.rmtree(partial)
            partial.mkdir(parents=True, exist_ok=True)
        world.barrier()
        ctx = StageContext(stage=st, cfg=cfg, run=run, out_dir=partial, is_main=world.is_main,
                           input_dirs=self._input_dirs(st, cfg, cfg_dict), rank=world.rank,
                           world_size=world.size, barrier=world.barrier)
        for name, d in ctx.input_dirs.items():
            if d is None and name in st.inputs:
                raise StageInputError(f"stage '{st.name}': input stage '{name}' did not complete")
        started = time.time()
        st.fn(ctx)
        world.barrier()
        if world.is_main:
            self._complete(st, cfg_dict, run, ctx, partial, final, time.time() - started)
        world.barrier()

    def _complete(self, st: Stage, cfg_dict: dict, run: Any, ctx: StageContext, partial: Path, final: Path,
                  seconds: float) -> None:
        (partial / ROWS).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in ctx.rows),
                                    encoding="utf-8")
        (partial / "stage.json").write_text(json.dumps(jsonable(self.spec(st.name, cfg_dict)), indent=1,
                                                       sort_keys=True), encoding="utf-8")
        info = {"stage": st.name, "seconds": round(seconds, 3), "run_id": getattr(run, "run_id", None),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "n_rows": len(ctx.rows)}
        (partial / COMPLETE).write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
        _fsync_tree(partial)
        old = None
        if final.exists():  # --force: move the old output aside, then swap, then delete it
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(partial, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._log_rows_once(final, run)

    @staticmethod
    def _log_rows_once(final: Path, run: Any) -> None:
        """Log a completed stage's rows to the run unless they already were (a kill between the folder's
        rename and this point would otherwise lose them)."""
        if (final / LOGGED).is_file():
            return
        for line in (final / ROWS).read_text(encoding="utf-8").splitlines():
            if line.strip():
                run.log(**json.loads(line))
        with contextlib.suppress(OSError):
            (final / LOGGED).write_text(json.dumps({"run_id": getattr(run, "run_id", None)}), encoding="utf-8")


# ---------------------------------------------------------------------------------- entry point
EPILOG = """common options of every experiment:
  key=value            dotted config override (e.g. seed=1 train.lr=3e-4); --show-config lists every key
  stages=[a,b]         the stages to run (alias: --stage a,b); finished stages are skipped
"""


def build_parser(doc: str | None, stage_names: Sequence[str]):
    """The experiment CLI: common.config's options plus the stage runner's."""
    parser = make_parser(doc)
    parser.epilog = EPILOG + f"\nstages of this experiment, in order: {', '.join(stage_names)}"
    parser.add_argument("--stage", default=None, help="comma-separated stages to run (alias of stages=[...])")
    parser.add_argument("--force", action="store_true", help="rerun the selected stages even if complete")
    parser.add_argument("--outputs-dir", default=None,
                        help="root of stage outputs (default: config key outputs_dir, $LLM4ALL_OUTPUTS or ./outputs)")
    parser.add_argument("--show-config", action="store_true", help="print the resolved config (YAML) and exit")
    parser.add_argument("--list-stages", action="store_true",
                        help="print each stage, its output folder for this config and whether it is complete")
    return parser


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, StageInputError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input (missing data, model, bad file): one line and exit 2, no traceback."""
    from common.data import DatasetNotAvailableError, DataValidationError
    from common.models import ModelNotAvailableError

    return (*USER_ERRORS, DataValidationError, DatasetNotAvailableError, ModelNotAvailableError)


def run_experiment(experiment: str, config_cls: type, stages: Sequence[Stage], argv: list[str] | None = None,
                   doc: str | None = None, config_dir: str | Path | None = None,
                   setup: Callable[[Any], None] | None = None) -> int:
    """Parse the command line, then run the selected stages of ``experiment``; returns the exit code.

    ``config_cls`` must have a ``stages: list[str]`` field (default: every stage) and may have
    ``outputs_dir: str`` and ``seed: int``. ``setup(cfg)`` runs once before the stages (threads, device).
    """
    from common.results import Run

    pipeline = Pipeline(experiment, stages)
    if config_dir is None:
        config_dir = Path(sys.modules[config_cls.__module__].__file__).parent / "configs"
    parser = build_parser(doc, pipeline.names)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_intermixed_args(argv)
    if pre.stage is not None:  # the alias becomes an ordinary override, validated like any other
        names = [s.strip() for s in pre.stage.split(",") if s.strip()]
        argv = [*argv, f"stages=[{','.join(names)}]"]
    try:
        cfg, args = parse_config(config_cls, config_dir=config_dir, argv=argv, parser=parser)
    except SystemExit as exc:  # config errors (exit 2, message printed) and --help (exit 0)
        return int(exc.code or 0)
    unknown = [s for s in cfg.stages if s not in pipeline.stages]
    if unknown or not cfg.stages:
        src = "--stage" if pre.stage is not None else "key 'stages'"
        print(f"config error: {src}: unknown stage(s) {unknown}; stages of {experiment}: "
              f"{', '.join(pipeline.names)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.outputs_dir is not None:
        os.environ["LLM4ALL_OUTPUTS"] = str(Path(args.outputs_dir).expanduser().resolve())
        if hasattr(cfg, "outputs_dir"):
            cfg.outputs_dir = ""
    if args.show_config:
        print(to_yaml(cfg), end="")
        return 0
    if args.list_stages:
        cfg_dict = to_dict(cfg)
        for name in pipeline.names:
            d = pipeline.stage_dir(name, cfg, cfg_dict)
            state = "complete" if pipeline.is_complete(d) else "missing"
            shown = paths.repo_relative(d) if d.is_relative_to(paths.REPO_ROOT) else str(d)
            print(f"{name:16s} {state:9s} {shown}")
        return 0
    try:
        if setup is not None:
            setup(cfg)
        run = Run(experiment, config=cfg, seed=getattr(cfg, "seed", None), profile=args.profile_name)
        t0 = time.perf_counter()
        report = pipeline.run(cfg, run, list(cfg.stages), force=args.force)
        # per-stage status and wall time, and the number of processes, next to the run's provenance
        run.update_manifest(stages=report, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        run.finish()
        if is_main_process():
            print(f"[{experiment}] {len(report)} stage(s) in {time.perf_counter() - t0:.1f} s: "
                  + ", ".join(f"{k} {v['status']}" for k, v in report.items()), flush=True)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0

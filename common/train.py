"""A small training loop on accelerate: the same script runs on a laptop CPU and on a GPU cluster.

What it adds to accelerate: step-based (or epoch-based) training with gradient accumulation, periodic
*atomic* checkpoints (accelerate's ``save_state``: model, optimizer, scheduler, RNG states, plus the data
position and step), automatic resume from the latest complete checkpoint, a deterministic shuffle
that is identical after a resume, non-finite-loss detection, tqdm progress on the main process, an
event hook (used by exp_tor to measure training overhead), and for fine-tuning studies:

* LR schedules ``constant``, ``cosine``, ``linear`` and ``wsd`` (warmup-stable-decay), all with warm-up;
* periodic validation loss on an ``eval_dataset`` (``eval_every``), logged through accelerate's tracker
  API (``log_with``: TensorBoard, offline, by default) and, given a ``Run``, as curve rows of the results
  table;
* trajectory snapshots (``snapshot_every``, ``snapshot_epochs``): the trainable parameters at step 0,
  every k steps (and/or every epoch's end) and at the end, as
  ``out_dir/snapshots/step_XXXXXXXX.safetensors`` (optionally with Adam's moments beside them);
  checkpoint rotation never touches them;
* training a named subset of the parameters only (``trainable``: glob patterns), the rest frozen.

    result = train(model, dataset, TrainConfig(max_steps=200, checkpoint_every=50), out_dir="runs/x",
                   collate_fn=collate, eval_dataset=val)
    result.evals                      # [(step, val_loss), ...]
    load_snapshots("runs/x")          # [(step, {name: tensor}), ...] when snapshot_every > 0

A run killed at any moment and restarted with the same arguments continues from its last complete
checkpoint and ends with bit-identical weights on CPU (tests/test_train.py checks this with SIGKILL).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, Subset

log = logging.getLogger(__name__)

CKPT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
COMPLETE_MARKER = "COMPLETE.json"
PROGRESS_FILE = "progress.json"   # step, data position, validation curve of a checkpoint
SNAPSHOT_DIR = "snapshots"
SCHEDULES = ("constant", "cosine", "linear", "wsd")
TRACKERS = ("tensorboard", "wandb", "mlflow", "none")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


@dataclass
class TrainConfig:
    max_steps: int = 100            # optimizer updates (ignored when epochs is set)
    epochs: float | None = None     # if set: max_steps = ceil(epochs * optimizer steps per epoch)
    batch_size: int = 8             # per process, per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer update
    lr: float = 3e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"        # adamw | sgd (MTT's experts: plain SGD, constant rate)
    momentum: float = 0.0           # sgd only
    warmup_steps: int = 0
    warmup_ratio: float = 0.0       # used when warmup_steps == 0: ceil(ratio * max_steps) (HF's rule)
    lr_schedule: str = "cosine"     # cosine | linear | constant | wsd (warmup-stable-decay)
    decay_fraction: float = 0.1     # wsd: the last round(fraction * max_steps) steps decay to 0
    decay_type: str = "linear"      # wsd decay shape: linear | cosine | 1-sqrt (transformers' names)
    max_grad_norm: float = 1.0      # 0 disables clipping
    mixed_precision: str = "no"     # no | bf16 | fp16 (accelerate's switch)
    checkpoint_every: int = 0       # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2       # snapshots are never rotated
    log_every: int = 10             # steps between progress-bar updates and train_loss curve rows
    shuffle: bool = True
    seed: int = 0
    cpu: bool = False               # force CPU even where CUDA is available
    eval_every: int = 0             # with an eval_dataset: val loss at 0, k, 2k, ... and the end; 0 = end only
    eval_batch_size: int = 0        # 0 = batch_size
    snapshot_every: int = 0         # trainable-parameter snapshots at 0, k, 2k, ... and the end; 0 = off
    snapshot_epochs: bool = False   # also a snapshot at every epoch's end (LESS / MTT per-epoch checkpoints)
    snapshot_optimizer: bool = False  # also Adam's moments of the trainable parameters (LESS's features)
    trainable: tuple[str, ...] = ()  # glob patterns of parameter names to train, others frozen; () = as is
    checkpoint_frozen: bool = False  # also store frozen parameters in checkpoints (False: a resume takes
    #                                  them from the model passed in, e.g. the base model under LoRA)
    log_with: str = "tensorboard"   # tensorboard | wandb | mlflow | none (accelerate trackers)
    project_dir: str | None = None  # tracker logging dir; None = <out_dir>/tb

    def validate(self) -> None:
        if (self.epochs is None and self.max_steps < 1) or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("train.max_steps, train.batch_size and train.grad_accum must be >= 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"train.epochs must be > 0 (or None to use max_steps), got {self.epochs}")
        if self.mixed_precision not in ("no", "bf16", "fp16", "fp8"):
            raise ValueError(f"train.mixed_precision must be no|bf16|fp16|fp8, got {self.mixed_precision!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"train.lr_schedule must be {'|'.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"train.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.decay_type not in ("linear", "cosine", "1-sqrt"):
            raise ValueError(f"train.decay_type must be linear|cosine|1-sqrt, got {self.decay_type!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if min(self.eval_every, self.snapshot_every, self.checkpoint_every, self.warmup_steps) < 0:
            raise ValueError("train.eval_every, snapshot_every, checkpoint_every and warmup_steps must be >= 0")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"train.optimizer must be adamw|sgd, got {self.optimizer!r}")
        if self.log_with not in TRACKERS:
            raise ValueError(f"train.log_with must be {'|'.join(TRACKERS)}, got {self.log_with!r}")
        if isinstance(self.trainable, str):
            raise ValueError("train.trainable is a list of patterns, not one string")

    def num_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(self.warmup_ratio * self.max_steps)

    def num_decay_steps(self) -> int:
        """WSD: steps of the final decay phase."""
        return int(round(self.decay_fraction * self.max_steps))


@dataclass
class TrainResult:
    step: int
    final_loss: float
    losses: list[float] = field(default_factory=list)   # per optimizer step of *this* process lifetime
    resumed_from: int | None = None
    out_dir: Path | None = None
    evals: list[tuple[int, Any]] = field(default_factory=list)  # (step, loss or {name: loss}), incl. before a resume
    max_steps: int = 0                                   # resolved (from epochs where given)
    model: Any = None                                    # the trained model, unwrapped from accelerate's wrappers


class _Progress:
    """Step and data position, saved as PROGRESS_FILE with every checkpoint (not as an accelerate custom
    object: those accumulate on an accelerator shared by consecutive train() calls, and a checkpoint's count
    of them must then match the resuming process's)."""

    def __init__(self) -> None:
        self.step = 0           # optimizer updates done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch
        self.last_loss = float("nan")
        self.lr_sum, self.lr_updates = 0.0, 0  # rates of the updates since the last snapshot (its mean_lr)
        self.evals: list[tuple[int, float]] = []  # so a resumed run returns the whole validation curve

    def state_dict(self) -> dict:
        return {**self.__dict__, "evals": list(self.evals)}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
        self.evals = [tuple(e) for e in state.get("evals", [])]


def hf_causal_lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Default loss: a transformers model called with labels returns its own LM loss."""
    return model(**batch).loss


def hf_causal_lm_eval(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL, number of predicted tokens) of a batch with ``labels`` (-100 = ignored), so
    that a dataset's mean is per token, whatever the batching."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    target = labels[:, 1:]
    keep = target != -100
    nll = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum")
    return nll, keep.sum()


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_len(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}; pass eval_fn")


def _example_weighted(loss_fn: Callable) -> Callable:
    """An eval_fn from a loss_fn: the batch mean weighted by the number of examples in the batch."""
    def fn(model, batch):
        n = _batch_len(batch)
        return loss_fn(model, batch).detach() * n, torch.tensor(n)
    return fn


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint in ``out_dir`` (half-written ones are never returned)."""
    ckpts = [p for p in Path(out_dir).glob(f"{CKPT_PREFIX}*") if (p / COMPLETE_MARKER).is_file()]
    return max(ckpts, key=lambda p: int(p.name[len(CKPT_PREFIX):]), default=None)


def select_trainable(model: torch.nn.Module, patterns: Iterable[str]) -> list[str]:
    """Make exactly the parameters whose names match one of the glob ``patterns`` trainable (others get
    ``requires_grad=False``); returns the trainable names. A pattern matching nothing is an error (typo)."""
    patterns = list(patterns)
    names = [n for n, _ in model.named_parameters()]
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unused:
        raise ValueError(f"trainable pattern(s) {unused} match no parameter; names look like {names[:3]}")
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
        if param.requires_grad:
            chosen.append(name)
    return chosen


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad`` (what snapshots and ``save_trainable`` store)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, num_processes: int):
    import transformers

    # accelerate's prepared scheduler advances num_processes times per optimizer step, so the schedule
    # is laid out on that clock to keep "max_steps optimizer updates" meaning the same at any world size.
    warmup, total = cfg.num_warmup_steps() * num_processes, cfg.max_steps * num_processes
    if cfg.lr_schedule == "wsd":
        decay = cfg.num_decay_steps()
        if cfg.num_warmup_steps() + decay > cfg.max_steps:
            raise ValueError(f"wsd: warm-up ({cfg.num_warmup_steps()}) + decay ({decay}) steps exceed "
                             f"max_steps={cfg.max_steps}")
        return transformers.get_scheduler(
            "warmup_stable_decay", optimizer, num_warmup_steps=warmup, num_training_steps=total,
            scheduler_specific_kwargs={"num_decay_steps": decay * num_processes, "decay_type": cfg.decay_type})
    kind = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    return transformers.get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _emit(callbacks: Iterable[Callable[[str, dict], None]], event: str, **info: Any) -> None:
    info.setdefault("time", time.time())
    for cb in callbacks:
        cb(event, info)


def _save_checkpoint(accelerator, out_dir: Path, progress: _Progress, keep: int,
                     callbacks: Iterable[Callable]) -> Path:
    """accelerate.save_state into a temp dir, then an atomic rename: a kill leaves no partial checkpoint."""
    final = out_dir / f"{CKPT_PREFIX}{progress.step:08d}"
    tmp = out_dir / f"{TMP_PREFIX}{final.name}"
    _emit(callbacks, "checkpoint_begin", step=progress.step)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / PROGRESS_FILE).write_text(json.dumps(progress.state_dict()))
        marker = {"step": progress.step, "epoch": progress.epoch, "batch_in_epoch": progress.batch_in_epoch,
                  "num_processes": accelerator.num_processes, "time": time.time()}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker))
        _fsync_tree(tmp)
        if final.exists():  # same step saved twice (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
        old = sorted((p for p in out_dir.glob(f"{CKPT_PREFIX}*") if p != final),
                     key=lambda p: int(p.name[len(CKPT_PREFIX):]))
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    _emit(callbacks, "checkpoint_end", step=progress.step)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _drop_frozen_weights(models: list, weights: list, output_dir: str) -> None:
    """save_state hook: keep only trainable tensors in the checkpoint's model file (a LoRA checkpoint is
    then the adapters, not another copy of the base model)."""
    for model, state in zip(models, weights):
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        for name in [k for k in state if k not in keep]:
            del state[name]


def _check_checkpoint_has_trainable(ckpt: Path, model: torch.nn.Module) -> None:
    from safetensors import safe_open

    path = ckpt / "model.safetensors"
    if not path.is_file():  # accelerate's pickle format or a sharded engine: nothing to check here
        return
    with safe_open(str(path), framework="pt") as f:
        saved = set(f.keys())
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved)
    unknown = sorted(saved - set(model.state_dict()))
    if missing or unknown:
        raise ValueError(f"checkpoint {ckpt} does not match the model: trainable parameters missing "
                         f"{missing[:3]}, unknown tensors {unknown[:3]} (same model and trainable set?)")


# ------------------------------------------------------------------------------------- snapshots
OPTIM_PREFIX = "optim_"


def snapshot_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / SNAPSHOT_DIR / f"{CKPT_PREFIX}{step:08d}.safetensors"


def list_snapshots(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, file) of every trajectory snapshot in ``out_dir``, by step (without loading them)."""
    files = Path(out_dir, SNAPSHOT_DIR).glob(f"{CKPT_PREFIX}*.safetensors")
    return sorted((int(p.name[len(CKPT_PREFIX):-len(".safetensors")]), p) for p in files)


def load_snapshots(out_dir: str | Path, steps: Iterable[int] | None = None,
                   device: str = "cpu") -> list[tuple[int, dict[str, torch.Tensor]]]:
    """The trajectory: (step, {parameter name: tensor}) for every snapshot (or the given ``steps``)."""
    from safetensors.torch import load_file

    wanted = None if steps is None else set(steps)
    found = [(s, p) for s, p in list_snapshots(out_dir) if wanted is None or s in wanted]
    missing = sorted(wanted - {s for s, _ in found}) if wanted is not None else []
    if missing:
        raise FileNotFoundError(f"no snapshot for step(s) {missing} in {Path(out_dir, SNAPSHOT_DIR)}")
    return [(s, load_file(p, device=device)) for s, p in found]


def snapshot_info(out_dir: str | Path, step: int) -> dict:
    """A snapshot's metadata: step, epoch (epochs completed), lr (the rate of the update that led
    to it; at step 0 the rate of the first update) and mean_lr (the mean rate of the updates since the
    previous snapshot; nan for snapshots written before it was recorded)."""
    from safetensors import safe_open

    with safe_open(str(snapshot_path(out_dir, step)), framework="pt") as f:
        meta = f.metadata() or {}
    return {"step": int(meta.get("step", step)), "epoch": int(meta.get("epoch", -1)),
            "lr": float(meta.get("lr", "nan")), "mean_lr": float(meta.get("mean_lr", "nan"))}


def load_snapshot_optimizer(out_dir: str | Path, step: int, device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """Adam's state at a snapshot (``snapshot_optimizer=True``): {parameter name: {"exp_avg", "exp_avg_sq",
    "step"}} (LESS's Adam-preconditioned gradient features need these)."""
    from safetensors.torch import load_file

    path = snapshot_path(out_dir, step)
    flat = load_file(path.with_name(OPTIM_PREFIX + path.name), device=device)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        name, _, slot = key.rpartition("/")
        out.setdefault(name, {})[slot] = t
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(TMP_PREFIX + path.name)
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _optimizer_tensors(optimizer, model) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    flat = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for slot, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and p.requires_grad and id(p) in names:
                    flat[f"{names[id(p)]}/{slot}"] = v.detach().to("cpu", copy=True).contiguous()
    return flat


def _write_snapshot(accelerator, model, names: list[str], out_dir: Path, step: int, meta: dict,
                    optimizer: Any = None) -> None:
    """Trainable parameters at ``step`` (and Adam's state, given ``optimizer``) into temp files, then
    atomic renames, the parameters last. An existing snapshot is kept: a resumed run re-reaches steps the
    killed run already saved, with the same weights."""
    state = accelerator.get_state_dict(model)  # every rank: gathers sharded (FSDP/DeepSpeed) weights
    path = snapshot_path(out_dir, step)
    if not accelerator.is_main_process or path.exists():
        return
    metadata = {k: str(v) for k, v in meta.items()}
    if optimizer is not None:  # single process / DDP: the optimizer holds the unwrapped model's tensors
        _save_tensors(_optimizer_tensors(optimizer, accelerator.unwrap_model(model)),
                      path.with_name(OPTIM_PREFIX + path.name), metadata)
    wanted = set(names)
    _save_tensors({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items() if k in wanted},
                  path, metadata)


def _prepare_snapshot_dir(out_dir: Path, fresh: bool) -> None:
    folder = out_dir / SNAPSHOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{TMP_PREFIX}*"):
        stale.unlink(missing_ok=True)
    if fresh:  # a run starting from step 0 regenerates its trajectory: older files belong to another run
        for p in folder.glob("*.safetensors"):
            p.unlink()


# ---------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Any, eval_fn: Callable, batch_size: int,
             collate_fn: Callable | None = None, accelerator: Any = None) -> float:
    """Mean loss over ``dataset`` in order: sum of ``eval_fn``'s (sum, count) pairs over all batches,
    divided by the total count. Under several processes each takes every num_processes-th example and
    the sums are added up, so the result does not depend on the world size (up to float rounding)."""
    from accelerate.utils import send_to_device

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    # unwrapped: DDP's forward would try to sync with ranks that hold a different number of batches;
    # accelerate's autocast wrapper (mixed precision) stays on the forward
    net = accelerator.unwrap_model(model) if accelerator else model
    part = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    # a private generator: iter() on a DataLoader otherwise draws a seed from the global RNG
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                        generator=torch.Generator())
    was_training = net.training
    net.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for batch in loader:
            s, n = eval_fn(net, send_to_device(batch, device))
            total += s.detach().to(device, torch.float64)
            count += torch.as_tensor(n, device=device, dtype=torch.float64)
    finally:
        net.train(was_training)
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, reduction="sum")
        count = accelerator.reduce(count, reduction="sum")
    return float(total / count) if count.item() > 0 else float("nan")


# ------------------------------------------------------------------------------------ trackers
def make_accelerator(cfg: TrainConfig, out_dir: str | Path | None = None, **kwargs: Any):
    """An Accelerator for ``cfg``. Without CUDA it asks for CPU explicitly: under torchrun
    (``accelerate launch --multi_gpu``) that is what turns N processes into one gloo world instead of N
    independent single-process runs. With ``out_dir`` its trackers (``cfg.log_with``) log under
    ``cfg.project_dir`` or ``<out_dir>/tb``."""
    from accelerate import Accelerator

    if out_dir is not None and cfg.log_with != "none" and "log_with" not in kwargs:
        from accelerate.tracking import get_available_trackers

        if cfg.log_with not in [str(t) for t in get_available_trackers()]:
            log.warning("train.log_with=%s: that package is not installed; no tracker logs", cfg.log_with)
        kwargs["log_with"] = cfg.log_with
        kwargs.setdefault("project_dir", str(cfg.project_dir or Path(out_dir) / "tb"))
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
                       cpu=cfg.cpu or not torch.cuda.is_available(), **kwargs)


def _tracker_config(cfg: TrainConfig) -> dict:
    # trackers take scalars only (TensorBoard's hparams)
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in dataclasses.asdict(cfg).items()}


class _Curves:
    """Train/val loss to the accelerate trackers and, with a Run and a table, as results-table rows."""

    def __init__(self, accelerator, run, table: str | None, method: str, params: dict | None, log_every: int):
        self.acc, self.run, self.table, self.method = accelerator, run, table, method
        self.params, self.log_every = dict(params or {}), max(log_every, 1)
        self.window: list[float] = []

    def _row(self, metric: str, value: float, step: int, n: int) -> None:
        if self.run is not None and self.table:
            self.run.log(table=self.table, method=self.method, metric=metric, value=value, n=n,
                         params={"step": step, **self.params})

    def train_step(self, step: int, loss: float, lr: float, last: bool) -> None:
        self.acc.log({"train_loss": loss, "lr": lr}, step=step)
        self.window.append(loss)
        if step % self.log_every == 0 or last:
            self._row("train_loss", sum(self.window) / len(self.window), step, len(self.window))
            self.window = []

    def eval(self, step: int, val_loss: float, n: int, suffix: str = "") -> None:
        self.acc.log({f"val_loss{suffix}": val_loss}, step=step)
        self._row(f"val_loss{suffix}", val_loss, step, n)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Per-process batches of ``batch_size`` taken in order from ``sampler``, dropping the last incomplete
    *global* batch (``batch_size * num_processes`` examples): accelerate deals batch j to process
    j % num_processes, so global step k sees examples [k*B, (k+1)*B) of the epoch's order, the same ones
    a single process with batch B would see (``drop_last`` per process would instead pad with repeats)."""

    def __init__(self, sampler: torch.utils.data.Sampler, batch_size: int, num_processes: int = 1) -> None:
        self.sampler, self.batch_size, self.num_processes = sampler, batch_size, num_processes
        self.drop_last = True

    def __len__(self) -> int:
        return len(self.sampler) // (self.batch_size * self.num_processes) * self.num_processes

    def __iter__(self):
        order = list(self.sampler)
        for j in range(len(self)):
            yield order[j * self.batch_size:(j + 1) * self.batch_size]


def _resolve_steps(cfg: TrainConfig, n_examples: int, num_processes: int) -> TrainConfig:
    """max_steps from epochs: GlobalBatchSampler gives n // (batch * processes) batches per epoch and
    process; an epoch's last short accumulation group is an update too."""
    if cfg.epochs is None:
        return cfg
    batches = n_examples // (cfg.batch_size * num_processes)   # per process (GlobalBatchSampler)
    per_epoch = math.ceil(batches / cfg.grad_accum)
    return dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * per_epoch)))


def train(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] = hf_causal_lm_loss,
    collate_fn: Callable | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    callbacks: Iterable[Callable[[str, dict], None]] = (),
    accelerator: Any = None,
    resume: bool = True,
    eval_dataset: Any = None,
    eval_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, Any]] | None = None,
    run: Any = None,
    curve_table: str | None = None,
    curve_method: str = "train",
    curve_params: dict | None = None,
    sampler: torch.utils.data.Sampler | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer updates (or ``cfg.epochs``), checkpointing into
    ``out_dir``.

    ``loss_fn(model, batch)`` returns the scalar loss of one micro-batch. ``callbacks`` receive
    ``(event, info)`` for train_begin, resume, step_end, epoch_end, eval, checkpoint_begin/end and
    train_end. Resumes automatically from the latest complete checkpoint in ``out_dir`` unless
    ``resume=False`` (a fresh start also clears ``out_dir/snapshots``).

    With ``eval_dataset``, the validation loss is computed at step 0, every ``cfg.eval_every`` steps and
    at the end (``eval_every=0``: at the end only): ``eval_fn(model, batch) -> (loss sum, count)``,
    summed over the dataset in order (default: per answer token for transformers LMs with ``labels``
    via ``hf_causal_lm_eval``, else ``loss_fn`` weighted by examples per batch). A dict of named datasets
    gives one loss per name (``evals`` entries ``(step, {name: loss})``, metrics ``val_loss_<name>``). Train
    and val losses go
    to the trackers of ``cfg.log_with`` and, with ``run`` (a ``common.results.Run``) and ``curve_table``,
    become rows (metric ``train_loss`` every ``log_every`` steps, ``val_loss`` at each evaluation;
    method ``curve_method``, params ``{"step": s, **curve_params}``). A resumed run logs rows from its
    resume step on. If ``optimizer`` is None, ``cfg.optimizer`` (AdamW or SGD) over the parameters with
    ``requires_grad``.

    ``sampler`` replaces the seeded shuffle (``cfg.shuffle``) with a fixed order of example indices, e.g. a
    ``common.curriculum.CurriculumSampler``: one loader epoch is one pass over it (its ``set_epoch`` is
    called at every epoch start), and a resume skips the batches already consumed, so it must give the
    same order every time it is iterated for the same epoch.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg.validate()
    callbacks = list(callbacks)
    out_dir = Path(out_dir)
    own_accelerator = accelerator is None
    accelerator = accelerator or make_accelerator(cfg, out_dir=out_dir)
    cfg = _resolve_steps(cfg, len(dataset) if sampler is None else len(sampler), accelerator.num_processes)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f"{TMP_PREFIX}*"):  # left by a kill mid-save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    if cfg.trainable:
        select_trainable(model, cfg.trainable)
    snap_names = trainable_names(model)
    snapshots = bool(cfg.snapshot_every or cfg.snapshot_epochs)
    if snapshots and not snap_names:
        raise ValueError("snapshots are on but the model has no trainable parameter")

    # The shuffle comes from our own generator, re-seeded per epoch, so batch order depends only on
    # (seed, epoch) and a resumed run sees exactly the batches the uninterrupted run would have.
    shuffle_gen = torch.Generator()
    if sampler is None:
        sampler = RandomSampler(dataset, generator=shuffle_gen) if cfg.shuffle else SequentialSampler(dataset)
    # A DataLoader draws a worker base seed from its generator (else the *global* RNG) at every iter();
    # a private generator keeps that draw from shifting the dropout RNG stream when a resume re-creates
    # the iterator mid-epoch.
    loader = DataLoader(dataset, batch_sampler=GlobalBatchSampler(sampler, cfg.batch_size, accelerator.num_processes),
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(cfg.seed))
    if optimizer is None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = (torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
                     if cfg.optimizer == "sgd" else
                     torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay))
    if scheduler is None:
        scheduler = _make_scheduler(optimizer, cfg, accelerator.num_processes)
    if not own_accelerator:  # a shared accelerator checkpoints what it prepared: only this call's objects
        accelerator.free_memory()
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    progress = _Progress()
    batches_per_epoch = len(loader)
    if batches_per_epoch < cfg.grad_accum:
        raise ValueError(f"dataset gives {batches_per_epoch} batches per epoch per process, fewer than "
                         f"train.grad_accum={cfg.grad_accum}; use a smaller batch or more data")

    frozen_in_ckpt = cfg.checkpoint_frozen or all(p.requires_grad for p in model.parameters())
    hook = None if frozen_in_ckpt else accelerator.register_save_state_pre_hook(_drop_frozen_weights)
    resumed_from = None
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        legacy = not (ckpt / PROGRESS_FILE).is_file()
        if legacy:  # written before PROGRESS_FILE: the progress is accelerate's custom object 0
            accelerator.register_for_checkpointing(progress)
        if frozen_in_ckpt:
            accelerator.load_state(str(ckpt))
        else:  # frozen weights come from the model passed in; every trainable one must be in the file
            _check_checkpoint_has_trainable(ckpt, model)
            accelerator.load_state(str(ckpt), strict=False)
        if not legacy:
            progress.load_state_dict(json.loads((ckpt / PROGRESS_FILE).read_text()))
        resumed_from = progress.step
        _emit(callbacks, "resume", step=progress.step, checkpoint=str(ckpt))
    if snapshots and accelerator.is_main_process:
        _prepare_snapshot_dir(out_dir, fresh=ckpt is None)
    accelerator.wait_for_everyone()
    if own_accelerator and accelerator.log_with:
        accelerator.init_trackers(out_dir.name or "train", config=_tracker_config(cfg))
    curves = _Curves(accelerator, run, curve_table, curve_method, curve_params, cfg.log_every)
    if eval_fn is None:
        eval_fn = hf_causal_lm_eval if loss_fn is hf_causal_lm_loss else _example_weighted(loss_fn)
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    def run_eval() -> None:
        if isinstance(eval_dataset, Mapping):  # several named validation sets (e.g. one per language)
            vals = {name: evaluate(model, ds, eval_fn, eval_bs, collate_fn, accelerator)
                    for name, ds in eval_dataset.items()}
            progress.evals.append((progress.step, vals))
            for name, ds in eval_dataset.items():
                curves.eval(progress.step, vals[name], len(ds), suffix=f"_{name}")
            _emit(callbacks, "eval", step=progress.step, val_loss=vals,
                  n={k: len(v) for k, v in eval_dataset.items()})
            return
        val = evaluate(model, eval_dataset, eval_fn, eval_bs, collate_fn, accelerator)
        progress.evals.append((progress.step, val))
        curves.eval(progress.step, val, len(eval_dataset))
        _emit(callbacks, "eval", step=progress.step, val_loss=val, n=len(eval_dataset))

    def due(every: int, done: bool) -> bool:
        return done or bool(every and progress.step % every == 0)

    def snapshot(lr: float) -> None:
        # mean_lr: the mean rate of the updates since the previous snapshot (LESS weighs an epoch-end
        # checkpoint by its epoch's mean rate); at step 0, the rate of the first update
        mean_lr = progress.lr_sum / progress.lr_updates if progress.lr_updates else lr
        _write_snapshot(accelerator, model, snap_names, out_dir, progress.step,
                        {"step": progress.step, "epoch": progress.epoch, "lr": lr, "mean_lr": mean_lr},
                        optimizer if cfg.snapshot_optimizer else None)
        progress.lr_sum, progress.lr_updates = 0.0, 0

    _emit(callbacks, "train_begin", step=progress.step, max_steps=cfg.max_steps)
    if ckpt is None:  # the start of the trajectory / curve (a resume has them already)
        if snapshots:
            snapshot(optimizer.param_groups[0]["lr"])
        if eval_dataset is not None and cfg.eval_every:
            run_eval()

    losses: list[float] = []
    bar = tqdm(total=cfg.max_steps, initial=progress.step, disable=not accelerator.is_local_main_process,
               desc="train", dynamic_ncols=True)
    model.train()
    accum_loss = torch.zeros((), device=accelerator.device)
    n_micro = 0
    try:
        while progress.step < cfg.max_steps:
            shuffle_gen.manual_seed(cfg.seed * 1_000_003 + progress.epoch)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(progress.epoch)
            epoch_loader = accelerator.skip_first_batches(loader, progress.batch_in_epoch) \
                if progress.batch_in_epoch else loader
            for batch in epoch_loader:
                with accelerator.accumulate(model):
                    loss = loss_fn(model, batch)
                    bad = accelerator.reduce((~torch.isfinite(loss.detach())).float(), reduction="sum")
                    if bad.item() > 0:
                        raise NonFiniteLossError(
                            f"non-finite loss ({loss.item()}) at step {progress.step + 1}, epoch "
                            f"{progress.epoch}, batch {progress.batch_in_epoch}; last finite loss "
                            f"{progress.last_loss:.4g}. Lower the learning rate, enable gradient clipping "
                            "or use fp32.")
                    accelerator.backward(loss)
                    accum_loss += loss.detach()
                    n_micro += 1
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    lr = optimizer.param_groups[0]["lr"]  # the rate this update uses
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                progress.batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                # n_micro < grad_accum only for an epoch's last, short accumulation group (accelerate syncs there)
                step_loss = accelerator.reduce(accum_loss / n_micro, reduction="mean").item()
                accum_loss.zero_()
                n_micro = 0
                progress.step += 1
                progress.last_loss = step_loss
                progress.lr_sum += lr
                progress.lr_updates += 1
                losses.append(step_loss)
                bar.update(1)
                done = progress.step >= cfg.max_steps
                if progress.step % max(cfg.log_every, 1) == 0:
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                curves.train_step(progress.step, step_loss, lr, done)
                _emit(callbacks, "step_end", step=progress.step, loss=step_loss, lr=lr)
                epoch_end = progress.batch_in_epoch >= batches_per_epoch
                if epoch_end:
                    progress.epoch += 1
                    progress.batch_in_epoch = 0
                    _emit(callbacks, "epoch_end", step=progress.step, epoch=progress.epoch - 1)
                if eval_dataset is not None and due(cfg.eval_every, done):
                    run_eval()
                if snapshots and (due(cfg.snapshot_every, done) or (cfg.snapshot_epochs and epoch_end)):
                    snapshot(lr)
                if due(cfg.checkpoint_every, done):
                    _save_checkpoint(accelerator, out_dir, progress, cfg.keep_checkpoints, callbacks)
                if done or progress.batch_in_epoch == 0:
                    break
            else:  # loader exhausted mid-accumulation (drop_last keeps this rare): start the next epoch
                progress.epoch += 1
                progress.batch_in_epoch = 0
                _emit(callbacks, "epoch_end", step=progress.step, epoch=progress.epoch - 1)
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
        if not own_accelerator:  # the next train() on this accelerator must not checkpoint this model
            accelerator.free_memory()
        if own_accelerator and accelerator.log_with:
            # not accelerator.end_training(): it also destroys the process group, which the caller's
            # later collectives (a pipeline's next stage, a barrier) still need
            for tracker in accelerator.trackers:
                tracker.finish()
    _emit(callbacks, "train_end", step=progress.step, loss=progress.last_loss)
    final = progress.last_loss
    return TrainResult(step=progress.step, final_loss=final if math.isfinite(final) else float("nan"),
                       losses=losses, resumed_from=resumed_from, out_dir=out_dir, evals=list(progress.evals),
                       max_steps=cfg.max_steps, model=accelerator.unwrap_model(model))

"""A small training loop on accelerate: the same script runs on a laptop CPU and on a GPU cluster.

What it adds to accelerate: step-based training with gradient accumulation, periodic *atomic*
checkpoints (accelerate's ``save_state``: model, optimizer, scheduler, RNG states, plus the data
position and step), automatic resume from the latest complete checkpoint, a deterministic shuffle
that is identical after a resume, non-finite-loss detection, tqdm progress on the main process, and
an event hook (used by exp_tor to measure training overhead).

    result = train(model, dataset, TrainConfig(max_steps=200, checkpoint_every=50), out_dir="runs/x",
                   collate_fn=collate)

A run killed at any moment and restarted with the same arguments continues from its last complete
checkpoint and ends with bit-identical weights on CPU (tests/test_train.py checks this with SIGKILL).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

CKPT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
COMPLETE_MARKER = "COMPLETE.json"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


@dataclass
class TrainConfig:
    max_steps: int = 100            # optimizer updates
    batch_size: int = 8             # per process, per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer update
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"     # cosine | linear | constant
    max_grad_norm: float = 1.0      # 0 disables clipping
    mixed_precision: str = "no"     # no | bf16 | fp16 (accelerate's switch)
    checkpoint_every: int = 0       # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    shuffle: bool = True
    seed: int = 0
    cpu: bool = False               # force CPU even where CUDA is available

    def validate(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("train.max_steps, train.batch_size and train.grad_accum must be >= 1")
        if self.mixed_precision not in ("no", "bf16", "fp16", "fp8"):
            raise ValueError(f"train.mixed_precision must be no|bf16|fp16|fp8, got {self.mixed_precision!r}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.lr_schedule must be cosine|linear|constant, got {self.lr_schedule!r}")


@dataclass
class TrainResult:
    step: int
    final_loss: float
    losses: list[float] = field(default_factory=list)   # per optimizer step of *this* process lifetime
    resumed_from: int | None = None
    out_dir: Path | None = None


class _Progress:
    """Step and data position; registered with accelerate so it is saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0           # optimizer updates done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch
        self.last_loss = float("nan")

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def hf_causal_lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Default loss: a transformers model called with labels returns its own LM loss."""
    return model(**batch).loss


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint in ``out_dir`` (half-written ones are never returned)."""
    ckpts = [p for p in Path(out_dir).glob(f"{CKPT_PREFIX}*") if (p / COMPLETE_MARKER).is_file()]
    return max(ckpts, key=lambda p: int(p.name[len(CKPT_PREFIX):]), default=None)


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, num_processes: int):
    import transformers

    # accelerate's prepared scheduler advances num_processes times per optimizer step, so the schedule
    # is laid out on that clock to keep "max_steps optimizer updates" meaning the same at any world size.
    kind = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    return transformers.get_scheduler(kind, optimizer, num_warmup_steps=cfg.warmup_steps * num_processes,
                                      num_training_steps=cfg.max_steps * num_processes)


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


def make_accelerator(cfg: TrainConfig, **kwargs: Any):
    """An Accelerator for ``cfg``. Without CUDA it asks for CPU explicitly: under torchrun
    (``accelerate launch --multi_gpu``) that is what turns N processes into one gloo world instead of N
    independent single-process runs."""
    from accelerate import Accelerator

    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
                       cpu=cfg.cpu or not torch.cuda.is_available(), **kwargs)


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
) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer updates, checkpointing into ``out_dir``.

    ``loss_fn(model, batch)`` returns the scalar loss of one micro-batch. ``callbacks`` receive
    ``(event, info)`` for train_begin, resume, step_end, checkpoint_begin/end and train_end.
    Resumes automatically from the latest complete checkpoint in ``out_dir`` unless ``resume=False``.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg.validate()
    callbacks = list(callbacks)
    out_dir = Path(out_dir)
    accelerator = accelerator or make_accelerator(cfg)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f"{TMP_PREFIX}*"):  # left by a kill mid-save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()

    # The shuffle comes from our own generator, re-seeded per epoch, so batch order depends only on
    # (seed, epoch) and a resumed run sees exactly the batches the uninterrupted run would have.
    shuffle_gen = torch.Generator()
    sampler = RandomSampler(dataset, generator=shuffle_gen) if cfg.shuffle else SequentialSampler(dataset)
    # A DataLoader draws a worker base seed from its generator (else the *global* RNG) at every iter();
    # a private generator keeps that draw from shifting the dropout RNG stream when a resume re-creates
    # the iterator mid-epoch.
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_fn,
                        drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if scheduler is None:
        scheduler = _make_scheduler(optimizer, cfg, accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    progress = _Progress()
    accelerator.register_for_checkpointing(progress)
    batches_per_epoch = len(loader)
    if batches_per_epoch < cfg.grad_accum:
        raise ValueError(f"dataset gives {batches_per_epoch} batches per epoch per process, fewer than "
                         f"train.grad_accum={cfg.grad_accum}; use a smaller batch or more data")

    resumed_from = None
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        resumed_from = progress.step
        _emit(callbacks, "resume", step=progress.step, checkpoint=str(ckpt))
    _emit(callbacks, "train_begin", step=progress.step, max_steps=cfg.max_steps)

    losses: list[float] = []
    bar = tqdm(total=cfg.max_steps, initial=progress.step, disable=not accelerator.is_local_main_process,
               desc="train", dynamic_ncols=True)
    model.train()
    accum_loss = torch.zeros((), device=accelerator.device)
    n_micro = 0
    while progress.step < cfg.max_steps:
        shuffle_gen.manual_seed(cfg.seed * 1_000_003 + progress.epoch)
        epoch_loader = accelerator.skip_first_batches(loader, progress.batch_in_epoch) \
            if progress.batch_in_epoch else loader
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
                bad = accelerator.reduce((~torch.isfinite(loss.detach())).float(), reduction="sum")
                if bad.item() > 0:
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at step {progress.step + 1}, epoch {progress.epoch}, "
                        f"batch {progress.batch_in_epoch}; last finite loss {progress.last_loss:.4g}. "
                        "Lower the learning rate, enable gradient clipping or use fp32.")
                accelerator.backward(loss)
                accum_loss += loss.detach()
                n_micro += 1
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
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
            losses.append(step_loss)
            bar.update(1)
            if progress.step % max(cfg.log_every, 1) == 0:
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            _emit(callbacks, "step_end", step=progress.step, loss=step_loss)
            if progress.batch_in_epoch >= batches_per_epoch:
                progress.epoch += 1
                progress.batch_in_epoch = 0
            done = progress.step >= cfg.max_steps
            if done or (cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0):
                _save_checkpoint(accelerator, out_dir, progress, cfg.keep_checkpoints, callbacks)
            if done or progress.batch_in_epoch == 0:
                break
        else:  # loader exhausted mid-accumulation (drop_last keeps this rare): start the next epoch
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()
    _emit(callbacks, "train_end", step=progress.step, loss=progress.last_loss)
    final = progress.last_loss
    return TrainResult(step=progress.step, final_loss=final if math.isfinite(final) else float("nan"),
                       losses=losses, resumed_from=resumed_from, out_dir=out_dir)

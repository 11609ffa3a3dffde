"""Contrastive pretraining of the offline CLIP (stage ``pretrain_clip``).

Captions come from class names and templates ("a photo of a red seven."), so a batch holds many images of
one caption. The loss is CLIP's image-to-text InfoNCE with the batch's texts de-duplicated: every image is
scored against one caption of *every* pretraining class (a template drawn per class and step) and the
cross-entropy picks its own. The text tower is frozen, so its pooled states of every (template, class)
caption are computed once; only the text projection, the image tower and the temperature learn.

Resumable: ``state.pt`` (towers, optimiser, schedule, RNG, epoch) is written atomically after every epoch,
so a killed run loses at most one epoch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from exp_plpp.offline_clip import OfflineCLIP, normalise_images

TEMPLATES = ["a photo of a {}.", "a {}.", "a picture of a {}.", "an image of the {}.", "a drawing of a {}."]


@dataclass
class PretrainConfig:
    epochs: int = 4
    batch_size: int = 256
    lr: float = 2e-3                 # AdamW; linear warm-up then cosine decay to 0
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_logit_scale: float = 100.0   # CLIP clips exp(logit_scale) at 100
    augment: bool = True             # random 2-pixel shifts (no flips: digits and shapes are not symmetric)
    templates: list[str] = field(default_factory=lambda: list(TEMPLATES))

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError("pretrain: epochs >= 1, batch_size >= 2 and lr > 0 are required")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("pretrain.templates: every template needs a '{}' for the class name")


def _lr_at(step: int, total: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _shift(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero padding), one offset per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def atomic_torch_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def pretrain(model: OfflineCLIP, images: np.ndarray, labels: np.ndarray, classnames: list[str],
             cfg: PretrainConfig, seed: int, state_path: Path, log=print) -> list[dict]:
    """Train ``model`` in place on ``images`` (N, 32, 32, 3 uint8) with class ``labels`` into ``classnames``;
    returns one record per epoch (loss, accuracy over the pretraining classes, temperature, seconds)."""
    cfg.validate()
    captions = [t.format(c) for t in cfg.templates for c in classnames]
    pooled = model.pooled_text(captions).view(len(cfg.templates), len(classnames), -1)
    x_all = normalise_images(torch.from_numpy(images), model.image_mean, model.image_std)
    y_all = torch.from_numpy(labels.astype(np.int64))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(y_all) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    start_epoch = 0
    if state_path.exists():   # resume after a kill: everything that decides the next epoch is in the state
        state = torch.load(state_path, weights_only=False)
        model.load_trainable_state(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        history, start_epoch = state["history"], state["epoch"]
        log(f"[pretrain_clip] resumed after epoch {start_epoch}")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        model.text_model.eval()   # frozen: no dropout
        t0, tot_loss, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(y_all), generator=gen)
        for b in range(steps_per_epoch):
            step = epoch * steps_per_epoch + b
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg)
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = _shift(x_all[idx], gen) if cfg.augment else x_all[idx]
            pick = torch.randint(0, len(cfg.templates), (len(classnames),), generator=gen)
            text = pooled[pick, torch.arange(len(classnames))]
            img_f = F.normalize(model.encode_image(x), dim=-1)
            txt_f = F.normalize(model.text_projection(text), dim=-1)
            logits = model.logit_scale.exp().clamp(max=cfg.max_logit_scale) * img_f @ txt_f.T
            loss = F.cross_entropy(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():   # CLIP clamps the learned temperature
                model.logit_scale.clamp_(max=math.log(cfg.max_logit_scale))
            tot_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y_all[idx]).sum())
        rec = {"epoch": epoch + 1, "loss": tot_loss / len(y_all), "train_acc": correct / len(y_all),
               "temperature": float(1 / model.logit_scale.detach().exp()), "seconds": time.perf_counter() - t0}
        history.append(rec)
        log(f"[pretrain_clip] epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.3f} "
            f"acc {rec['train_acc']:.3f} T {rec['temperature']:.3f} ({rec['seconds']:.0f} s)")
        atomic_torch_save({"model": model.trainable_state(), "optimizer": opt.state_dict(),
                           "generator": gen.get_state(), "history": history, "epoch": epoch + 1}, state_path)
    model.eval()
    return history

"""The curriculum / mixture training study (part 2): small Llama-style LMs trained from scratch with
``common.train`` on the pool and order of each arm, validation loss per language every k steps.

One run = (LR schedule, arm, seed): the model initialisation and the base pool depend on the seed only, the
order on (arm, seed); batch, sequence length, token budget (one pass over the pool) and schedule are shared
by every arm, so the paired difference arm - random at a seed is the effect of the order (or of the pool,
for selection and mixture arms).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.train import TrainConfig, hf_causal_lm_eval, train
from exp_curriculum.arms import Arm, parse_arm
from exp_curriculum.study_data import StudyDataConfig

SCHEDULES = ("constant", "wsd")


@dataclass
class StudyModelConfig:
    arch: str = "llama"          # common.models.build_causal_lm architecture
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 352              # SwiGLU width ~ 8/3 d_model (Llama's ratio), a multiple of 32


@dataclass
class StudyTrainConfig:
    global_batch: int = 16       # sequences per optimizer step over all processes (the order's batch)
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying to 0 (linear)
    max_grad_norm: float = 1.0
    eval_every: int = 16         # steps between validation evaluations (both languages)
    checkpoint_every: int = 40
    eval_batch_size: int = 32


@dataclass
class ReferenceConfig:
    epochs: float = 3.0          # the reference LM (difficulty "perplexity") on the reserved sequences
    lr: float = 2e-3


@dataclass
class SelectConfig:
    factor: float = 2.0          # candidates of the selection arms = factor x the budget (per language)
    askllm_model: str = "smollm2-135m-instruct"
    askllm_max_tokens: int = 128
    askllm_batch: int = 8
    encoder_max_tokens: int = 128   # MiniLM embeddings for D4 and Density
    bandwidth: float = 0.5
    n_clusters: int = 20
    eps: float = 0.05


@dataclass
class StudyConfig:
    data: StudyDataConfig = field(default_factory=StudyDataConfig)
    model: StudyModelConfig = field(default_factory=StudyModelConfig)
    train: StudyTrainConfig = field(default_factory=StudyTrainConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    budget_sequences: int = 2048     # the pool: one pass = the token budget (x seq_len tokens)
    en_fraction: float = 0.5         # English share of the base pool (per-language validation either way)
    arms: list[str] = field(default_factory=lambda: ["random", "easy_to_hard:compression"])
    schedules: list[str] = field(default_factory=lambda: ["constant"])
    wsd_arms: list[str] = field(default_factory=lambda: ["*"])   # arms also run under wsd ("*" = all)
    seeds: list[int] = field(default_factory=lambda: [0])
    smoothing: float = 0.6           # EMA weight of the validation curves before steps-to-target

    def parsed_arms(self) -> list[Arm]:
        arms = [parse_arm(a) for a in self.arms]
        if not any(a.is_baseline for a in arms):
            raise ValueError("study.arms must include 'random' (the baseline every arm is compared with)")
        if len({a.spec for a in arms}) != len(arms):
            raise ValueError(f"study.arms has duplicates: {self.arms}")
        return arms

    def validate(self) -> None:
        self.data.validate()
        arms = self.parsed_arms()
        bad = [s for s in self.schedules if s not in SCHEDULES]
        if bad or not self.schedules:
            raise ValueError(f"study.schedules must be a non-empty subset of {SCHEDULES}, got {self.schedules}")
        unknown = [a for a in self.wsd_arms if a != "*" and a not in {x.spec for x in arms}]
        if unknown:
            raise ValueError(f"study.wsd_arms {unknown} are not in study.arms")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds must be distinct and non-empty, got {self.seeds}")
        if self.budget_sequences < self.train.global_batch:
            raise ValueError("study.budget_sequences must be >= study.train.global_batch")
        if not 0.0 <= self.en_fraction <= 1.0 or not 0.0 <= self.smoothing < 1.0:
            raise ValueError("study.en_fraction must be in [0, 1] and study.smoothing in [0, 1)")
        if self.select.factor < 1.0:
            raise ValueError("study.select.factor must be >= 1 (selection picks the budget from more candidates)")

    def steps(self) -> int:
        return self.budget_sequences // self.train.global_batch


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-")


def jobs(cfg: StudyConfig) -> list[dict]:
    """Every (schedule, arm, seed) run, baseline first so that a partial study is already comparable."""
    out = []
    arms = cfg.parsed_arms()
    for schedule in cfg.schedules:
        chosen = [a for a in arms if schedule != "wsd" or "*" in cfg.wsd_arms or a.is_baseline
                  or a.spec in cfg.wsd_arms]
        chosen.sort(key=lambda a: not a.is_baseline)
        for arm in chosen:
            for seed in cfg.seeds:
                out.append({"name": f"{schedule}__{slug(arm.spec)}__s{seed}", "schedule": schedule,
                            "arm": arm.spec, "seed": seed})
    return out


class SequenceDataset(torch.utils.data.Dataset):
    """Fixed-length token sequences as causal-LM examples (labels = inputs; transformers shifts them)."""

    def __init__(self, sequences: np.ndarray) -> None:
        self.data = torch.from_numpy(np.ascontiguousarray(sequences).astype(np.int64))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.data[i]
        return {"input_ids": x, "labels": x}


def build_model(cfg: StudyModelConfig, vocab_size: int, seq_len: int, seed: int) -> torch.nn.Module:
    from common.models import build_causal_lm

    torch.manual_seed(seed)  # the initialisation depends on the seed only, never on the arm
    return build_causal_lm(cfg.arch, vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                           n_heads=cfg.n_heads, d_ff=cfg.d_ff, max_seq_len=seq_len)


def train_config(cfg: StudyConfig, schedule: str, seed: int, world: int, out_dir: Path) -> TrainConfig:
    t = cfg.train
    if t.global_batch % world:
        raise ValueError(f"study.train.global_batch={t.global_batch} is not divisible by the {world} processes")
    return TrainConfig(max_steps=cfg.steps(), batch_size=t.global_batch // world, lr=t.lr,
                       weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_schedule=schedule,
                       decay_fraction=t.decay_fraction, max_grad_norm=t.max_grad_norm, seed=seed,
                       eval_every=t.eval_every, eval_batch_size=t.eval_batch_size,
                       checkpoint_every=t.checkpoint_every, keep_checkpoints=1, log_every=t.eval_every,
                       shuffle=False, log_with="tensorboard", project_dir=str(out_dir / "tb"))


def run_job(job: dict, cfg: StudyConfig, sequences: np.ndarray, order_rows: np.ndarray,
            val: dict[str, np.ndarray], vocab_size: int, out_dir: Path, accelerator: Any = None) -> dict:
    """Train one run on ``sequences[order_rows]`` in that order; its curve and timing.

    ``order_rows`` are the sequence rows in training order (length = steps x global batch)."""
    from common.curriculum import CurriculumSampler

    world = accelerator.num_processes if accelerator is not None else 1
    tcfg = train_config(cfg, job["schedule"], job["seed"], world, out_dir)
    model = build_model(cfg.model, vocab_size, cfg.data.seq_len, job["seed"])
    data = SequenceDataset(sequences[order_rows])
    t0 = time.perf_counter()
    res = train(model, data, tcfg, out_dir=out_dir, sampler=CurriculumSampler(np.arange(len(data))),
                eval_dataset={lang: SequenceDataset(v) for lang, v in val.items()}, eval_fn=hf_causal_lm_eval,
                accelerator=accelerator)
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    curve = [{"step": s, "tokens": s * tokens_per_step, **{f"val_{k}": float(v) for k, v in vals.items()}}
             for s, vals in res.evals]
    return {**job, "curve": curve, "final_train_loss": res.final_loss, "steps": res.step,
            "seconds": time.perf_counter() - t0, "resumed_from": res.resumed_from,
            "n_params": sum(p.numel() for p in model.parameters())}


def mixed_loss(point: dict, languages: list[str]) -> float:
    """The languages' mean validation loss at one point (each language's set has the same size)."""
    return float(np.mean([point[f"val_{lg}"] for lg in languages]))


def save_job(folder: Path, result: dict) -> None:
    from common.results import atomic_write_text

    atomic_write_text(folder / f"{result['name']}.json", json.dumps(result, sort_keys=True))


def load_jobs(folder: Path, names: list[str]) -> list[dict]:
    return [json.loads((folder / f"{n}.json").read_text(encoding="utf-8")) for n in names]


def tokens_budget(cfg: StudyConfig) -> int:
    return cfg.steps() * cfg.train.global_batch * cfg.data.seq_len


def describe_budget(cfg: StudyConfig) -> str:
    return (f"{cfg.steps()} steps x {cfg.train.global_batch} x {cfg.data.seq_len} tokens = "
            f"{tokens_budget(cfg) / 1e6:.2f} M tokens per run")


def is_finite_curve(curve: list[dict]) -> bool:
    return all(math.isfinite(v) for p in curve for k, v in p.items() if k.startswith("val_"))

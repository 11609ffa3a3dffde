"""Config of exp_distill_data (profiles: configs/quick.yaml, configs/small.yaml, configs/paper.yaml).

Every default here is the CPU `quick` size unless the comment says otherwise; profiles hold only what
they change (README "Adding an experiment").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import parse_field_overrides
from exp_distill_data.distill import DistillConfig
from exp_distill_data.source import SourceConfig

STAGES = ("data", "source", "base_eval", "less_warmup", "less_features", "less_select", "train", "evaluate",
          "experts", "distill", "project", "students", "students_eval", "table")
METHODS = ("full", "random", "less")
OFFLINE_SOURCE = "opt_local"   # the OPT-architecture source pretrained by the `source` stage


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["arc_easy", "mmlu_auxiliary_train"])
    extra_pools: list[str] = field(default_factory=list)     # e.g. [alpaca, lima]: optional instruction pools
    mmlu_aux_limit: int = 60           # seeded subsample of MMLU auxiliary_train (99,842 questions in all)
    arc_limit: int = 60                # seeded subsample of ARC-Easy train (2,251); 0 = all
    ngram: int = 13                    # decontamination n-gram length (words)
    val_per_subtask: int = 5           # LESS target examples per subtask (ARC-Easy dev; MMLU dev per subject)
    val_subjects: int = 4              # MMLU subjects used as LESS subtasks (0 = all 57)


@dataclass
class FinetuneConfig:
    """LoRA fine-tuning (``common.sft.SFTConfig``) of every trained model. LESS's paper settings (r 128,
    alpha 512, dropout 0.1, lr 2e-5, 4 epochs, warm-up 3 %, linear) are the paper profile's; the CPU
    default trains a small adapter with a larger learning rate for few steps."""

    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    lr: float = 3e-4
    epochs: float = 2.0
    warmup_ratio: float = 0.03
    lr_schedule: str = "linear"
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 256
    mixed_precision: str = "fp32"
    checkpoint_every: int = 25         # optimizer steps between resumable checkpoints of a fine-tune
    # the training prompt is the evaluation prompt itself ("Question: ...\nAnswer:" -> " answer"):
    # a raw template, not a chat template, so that the fine-tune teaches the format lm-eval scores
    template: str = "plain"
    plain_template: str = "{instruction}"


@dataclass
class LessConfig:
    warmup_fraction: float = 0.05      # LESS: LoRA warm-up on a random 5 % of the pool
    warmup_epochs: int = 2             # one feature checkpoint per epoch (LESS: 4)
    proj_dim: int = 512                # LESS: 8192
    batch_size: int = 16               # examples per feature shard (one projection per shard)
    max_len: int = 256


@dataclass
class ExpertConfig:
    """The expert trajectories (stage ``experts``): the distiller's LoRA (finetune.r / alpha / targets)
    trained on the full pool, K runs. MTT's experts: plain SGD at a constant rate, no clipping, snapshots
    of the parameters along the way; LoRA dropout off so that the inner loop's deterministic SGD steps
    are the same kind of step. Anchor defaults, not the paper's (it gives none)."""

    runs: int = 2                      # K expert runs (seeds seed, seed+1, ...): "the full dataset used several times"
    epochs: float = 2.0                # passes over the pool per run
    optimizer: str = "sgd"             # sgd (MTT) | adamw (an inner SGD student then matches only the path's shape)
    lr: float = 0.3                    # SGD moves LoRA slowly: a rate far above AdamW's
    momentum: float = 0.0
    max_grad_norm: float = 0.0         # MTT does not clip
    batch_size: int = 8
    snapshot_every: int = 2            # s: optimizer steps between snapshots (one trajectory point)
    max_len: int = 128                 # tokens per example (the synthetic sequences are as long)


@dataclass
class DistillSection:
    """Part 2: the trajectory-matching method (``exp_distill_data.distill``) and its students."""

    # the models that distil (each with its own experts): [] = every setting's selector. Distilling through
    # SmolLM2-135M's 30 layers costs tens of seconds per outer iteration on 2 CPU cores (bench_distill),
    # so CPU profiles distil with the OPT source only: the paper's OPT -> Llama transfer
    distillers: list[str] = field(default_factory=lambda: ["opt_local"])
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    match: DistillConfig = field(default_factory=DistillConfig)   # N, M, iterations, regulariser, ...
    # "ours" uses match.reg; "ours_noreg" the same with no regulariser (the paper's ablation)
    variants: list[str] = field(default_factory=lambda: ["ours", "ours_noreg"])
    # extra variants of "ours" for the ablation table, as dotted overrides of `match`
    # (e.g. "syn_steps=1", "metric=cosine", "init=random", "reg=admm"), on the first setting's
    # distiller, the first budget and the first seed
    ablations: list[str] = field(default_factory=list)
    embedding_student: bool = True     # also train the distiller on the continuous embeddings (no projection)
    source_student: bool = True        # also train the distiller itself on the projected text (X -> X)


VARIANTS = ("ours", "ours_noreg")


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "mmlu"])
    arc_questions: int = 200           # stratified, fixed-seed subsample of ARC-Easy test (2,376); 0 = all
    mmlu_questions: int = 57          # stratified by subject of MMLU test (14,042); 0 = all
    mmlu_shots: list[int] = field(default_factory=lambda: [0])
    subsample_seed: int = 1234
    batch_size: int = 16


@dataclass
class Config:
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    outputs_dir: str = ""
    threads: int = 2
    # (selector -> trainer) pairs: the model whose gradients LESS uses and the model fine-tuned on the
    # selected data. opt_local = the OPT source pretrained offline; any hub ID or local path works too.
    settings: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct->smollm2-135m-instruct",
                                                         "opt_local->smollm2-135m-instruct"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    budgets: list[float] = field(default_factory=lambda: [0.1])    # < 1: fraction of the pool; >= 1: count
    seeds: list[int] = field(default_factory=lambda: [0])           # random subsets and fine-tune seeds
    full_seeds: int = 0                # full-data fine-tunes (the costliest) use the first this-many seeds; 0 = all
    data: DataConfig = field(default_factory=DataConfig)
    source: SourceConfig = field(default_factory=SourceConfig)   # exp_distill_data.source
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    less: LessConfig = field(default_factory=LessConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillSection = field(default_factory=DistillSection)

    def validate(self) -> None:
        for s in self.settings:
            if s.count("->") != 1 or not all(part.strip() for part in s.split("->")):
                raise ValueError(f"settings: '{s}' must look like 'selector->trainer'")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: unknown {bad}; known: {list(METHODS)}")
        if any(b <= 0 for b in self.budgets):
            raise ValueError(f"budgets must be > 0 (fractions < 1 or counts >= 1), got {self.budgets}")
        if self.full_seeds < 0:
            raise ValueError(f"full_seeds must be >= 0 (0 = every seed), got {self.full_seeds}")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        if not 0 < self.less.warmup_fraction <= 1:
            raise ValueError("less.warmup_fraction must be in (0, 1]")
        self.distill.match.validate()
        sel = {s for s, _ in self.pairs()}
        if any(d not in sel for d in self.distill.distillers):
            raise ValueError(f"distill.distillers {self.distill.distillers} must be selectors of settings "
                             f"({sorted(sel)})")
        bad = [v for v in self.distill.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"distill.variants: unknown {bad}; known: {list(VARIANTS)}")
        for a in self.distill.ablations:
            parse_ablation(a)
        if self.distill.experts.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"distill.experts.optimizer must be sgd|adamw, got {self.distill.experts.optimizer!r}")
        if self.distill.experts.runs < 1 or self.distill.experts.snapshot_every < 1:
            raise ValueError("distill.experts.runs and distill.experts.snapshot_every must be >= 1")
        if self.finetune.method not in ("lora", "full"):
            raise ValueError(f"finetune.method must be lora|full, got {self.finetune.method!r}")

    def pairs(self) -> list[tuple[str, str]]:
        return [tuple(p.strip() for p in s.split("->")) for s in self.settings]  # type: ignore[misc]


def parse_ablation(spec: str) -> dict:
    """``"syn_steps=1,metric=cosine"`` -> {"syn_steps": 1, "metric": "cosine"}, checked against DistillConfig."""
    return parse_field_overrides(spec, DistillConfig, "distill.ablations")

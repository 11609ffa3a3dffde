"""Configs of the round-off experiments (profiles: configs/quick.yaml, configs/paper.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("depth", "meanmedian", "accum", "hyper", "sinks", "train", "guidelines")


@dataclass
class DepthConfig:
    archs: list[str] = field(default_factory=lambda: ["gpt2", "llama"])
    depths: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    precisions: list[str] = field(default_factory=lambda: ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2"])
    d_model: int = 64
    n_heads: int = 4
    n_inits: int = 3
    batch: int = 2
    seq_len: int = 32
    real_model: str = "smollm2-135m-instruct"   # "none" skips the real model
    real_tokens: int = 64
    real_precisions: list[str] = field(default_factory=lambda: ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2"])


@dataclass
class MeanMedianConfig:
    d_model: int = 20            # the authors' single-head, width-20 random transformers
    n_heads: int = 1
    n_layers: int = 8
    n_inits: int = 40
    init_gains: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0])
    batch: int = 2
    seq_len: int = 16
    precisions: list[str] = field(default_factory=lambda: ["bf16", "fp16"])


@dataclass
class AccumConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    batch: int = 2
    seq_len: int = 32
    n_inits: int = 2
    accumulators: list[str] = field(default_factory=lambda: ["fp32", "bf16", "fp16"])
    block_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 0])
    promote_groups: list[str] = field(default_factory=lambda: [
        "none", "attention", "scores", "softmax", "qkv", "attn_out", "mlp", "norm", "residual", "lm_head", "all"])


@dataclass
class HyperConfig:
    arch: str = "gpt2"
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 32
    batch: int = 2
    n_inits: int = 2
    precision: str = "bf16"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    heads: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seq_lens: list[int] = field(default_factory=lambda: [16, 32, 64])
    init_stds: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.2])
    qk_scales: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0, 64.0, 256.0])
    norm_eps: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-2])
    outliers: list[float] = field(default_factory=lambda: [0.0, 10.0, 100.0, 1000.0])
    outlier_kinds: list[str] = field(default_factory=lambda: ["dim", "mean"])  # one coordinate / all (mean shift)
    resid_scales: list[float] = field(default_factory=lambda: [0.25, 1.0, 4.0, 16.0])
    sink_logits: list[float] = field(default_factory=lambda: [0.0, 5.0, 10.0, 20.0, 40.0])
    sink_rows: int = 256


@dataclass
class SinksConfig:
    """In-model attention sinks (``models.add_attention_sink``): error vs measured sink mass."""

    archs: list[str] = field(default_factory=lambda: ["gpt2", "llama"])
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 32
    batch: int = 2
    n_inits: int = 2
    # mean attention mass on token 0 to calibrate to (float64); 0.0 = massive activation only, no sink
    target_masses: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.9, 0.99, 0.999])
    # precision recipes (PRECISIONS below) or the diagnostic variants of SINK_VARIANTS below
    precisions: list[str] = field(default_factory=lambda: ["bf16", "fp16", "bf16_softmax_bf16",
                                                           "bf16_scores_fp32"])
    massive: float = 100.0       # massive activation at position 0 (typical residual norm ~0.2)
    query_bias: float = 1.0      # shared query component along the sink's key coordinate
    bound: bool = True           # also the first-order bound and the statistical estimate of the logits


@dataclass
class TrainConfig:
    modes: list[str] = field(default_factory=lambda: ["fp32", "bf16_autocast", "fp16_loss_scaling", "fp8_emulated"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    corpus: str = "en/tinyshakespeare/input.txt"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    batch: int = 16
    steps: int = 150
    lr: float = 3e-3
    eval_batches: int = 8


@dataclass
class Config:
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    outputs_dir: str = ""       # root of stage outputs ("" = $LLM4ALL_OUTPUTS or <repo>/outputs)
    corpus: str = "en/tinyshakespeare/input.txt"   # input text for the forward-error experiments
    threads: int = 1
    device: str = "cpu"   # forward-error stages: "cpu", "cuda" or "auto" (cuda when available); training is CPU
    depth: DepthConfig = field(default_factory=DepthConfig)
    meanmedian: MeanMedianConfig = field(default_factory=MeanMedianConfig)
    accum: AccumConfig = field(default_factory=AccumConfig)
    hyper: HyperConfig = field(default_factory=HyperConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        for p in self.depth.precisions + self.depth.real_precisions + self.meanmedian.precisions + [
                self.hyper.precision]:
            if p not in PRECISIONS:
                raise ValueError(f"unknown precision '{p}'; known: {sorted(PRECISIONS)}")
        for p in self.sinks.precisions:
            if p not in PRECISIONS and p not in SINK_VARIANTS:
                raise ValueError(f"sinks.precisions: unknown '{p}'; known: {sorted(PRECISIONS) + SINK_VARIANTS}")
        if any(not 0.0 <= m < 1.0 for m in self.sinks.target_masses):
            raise ValueError(f"sinks.target_masses must lie in [0, 1), got {self.sinks.target_masses}")
        for a in self.sinks.archs:
            if a not in ("gpt2", "llama"):
                raise ValueError(f"sinks.archs: '{a}' not supported (gpt2, llama)")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got '{self.device}'")
        for m in self.train.modes:
            if m not in ("fp32", "bf16_autocast", "fp16_loss_scaling", "fp8_emulated"):
                raise ValueError(f"train.modes: unknown mode '{m}'")


# Named precision recipes (see exp_roundoff.run.policy_for): storage/GEMM format, accumulation.
PRECISIONS = {
    "fp32": "all ops fp32",
    "bf16": "bf16 storage, fp32 accumulation / norm and softmax internals",
    "fp16": "fp16 storage, fp32 accumulation / internals",
    "fp8_e4m3": "GEMM operands fp8 e4m3 (saturating), fp32 accumulation, bf16 everything else",
    "fp8_e5m2": "GEMM operands fp8 e5m2 (saturating), fp32 accumulation, bf16 everything else",
}
# Diagnostic variants of the sinks stage (exp_roundoff.run.sink_policy): the bf16 recipe with the softmax
# computed in bf16 (exposes its u_a|z_i| term) or with the attention logits stored in fp32.
SINK_VARIANTS = ["bf16_softmax_bf16", "bf16_scores_fp32"]

"""Configs of the round-off experiments (profiles: configs/quick.yaml, configs/paper.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("depth", "estimate", "meanmedian", "accum", "hyper", "sinks", "train", "guidelines", "authors_sweep")


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
class EstimateConfig:
    """The statistical estimate's accuracy (stage ``estimate``): estimate / measured error after the last block
    across init std and depth, on random models whose seeds neither the depth stage nor the tests use."""

    archs: list[str] = field(default_factory=lambda: ["gpt2", "llama", "opt"])
    init_stds: list[float] = field(default_factory=lambda: [0.02, 0.1, 0.3])
    depths: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    precisions: list[str] = field(default_factory=lambda: ["bf16"])
    d_model: int = 64
    n_heads: int = 4
    n_inits: int = 2
    batch: int = 2
    seq_len: int = 32


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
class AuthorsSweepConfig:
    """The authors' mantissa sweep (exp_roundoff/authors_sweep.py). Keys marked [reconstructed] are choices the
    authors' code description leaves open (README, section "Authors' sweep", gives the reason for each)."""

    model: str = "smollm2-135m-instruct"   # offline alias, folder or hub ID (paper: "gpt2"); "none" skips the stage
    data_path: str = ""        # text file / folder of .txt (relative to LLM4ALL_DATA or absolute); "" = corpus
    if_missing: str = "error"  # model or data_path not available: "error" (exit 2) or "skip" (a note, no rows)
    max_chars: int = 400_000   # text read from the source before tokenising
    n_seqs: int = 2
    seq_len: int = 64          # the authors: 1024
    n_layers: int = 2          # decoder blocks kept (0 = all); measured in every kept block
    targets: list[str] = field(default_factory=lambda: ["all"])   # authors_sweep.TARGETS keys, or ["all"]
    mantissa_bits: list[int] = field(default_factory=lambda: [7, 10, 14, 23])
    modes: list[str] = field(default_factory=lambda: ["efficient", "strict"])
    block_k: int = 32          # efficient mode's K block (the authors' "efficient" 32; strict = 1)
    tf32_operands: bool = True     # [reconstructed] efficient mode: tl.dot on fp32 inputs uses TF32
    tf32_rounding: str = "rz"      # [reconstructed] Triton's fp32 -> TF32 operand conversion truncates
    strict_fma: bool = False       # [reconstructed] strict mode: acc + a*b as two fp32 roundings (no FMA)
    references: list[str] = field(default_factory=lambda: ["fp64", "fp32"])  # fp64 = the authors'
    quantiles: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.5, 0.95, 0.99])
    # residual scaling sub-sweep: "forward" (x + s*branch, the authors') and/or "weights" (models.py)
    resid_scales: list[float] = field(default_factory=lambda: [0.25, 4.0])
    resid_kinds: list[str] = field(default_factory=lambda: ["forward", "weights"])
    resid_targets: list[str] = field(default_factory=lambda: ["o", "down"])
    resid_mantissa_bits: int = 10
    # the authors' weight reset (authors_sweep.reset_weights); off = the pretrained weights
    reset_linear: bool = False       # block GEMM weights ~ N(0, 1/d_in)
    reset_resid_proj: bool = False   # with reset_linear: residual projections' std x 1/sqrt(2 n_layer)
    reset_biases: bool = False
    reset_norms: bool = False        # norm weights 1, biases 0

    def validate(self) -> None:
        a = "authors"
        checks = [
            (set(self.modes) <= {"strict", "efficient"} and self.modes, f"{a}.modes: strict / efficient"),
            (all(1 <= p <= 23 for p in [*self.mantissa_bits, self.resid_mantissa_bits]),
             f"{a}.mantissa_bits: fraction bits in 1..23 (23 = fp32)"),
            (self.tf32_rounding in ("rne", "rz"), f"{a}.tf32_rounding: rne or rz"),
            (set(self.references) <= {"fp64", "fp32"} and self.references, f"{a}.references: fp64 / fp32"),
            (set(self.resid_kinds) <= {"forward", "weights"}, f"{a}.resid_kinds: forward / weights"),
            (all(0.0 < q < 1.0 for q in self.quantiles), f"{a}.quantiles: in (0, 1)"),
            (self.if_missing in ("error", "skip"), f"{a}.if_missing: error or skip"),
            (self.block_k >= 1 and self.seq_len >= 2 and self.n_seqs >= 1, f"{a}: block_k, seq_len, n_seqs >= 1"),
            (self.reset_linear or not self.reset_resid_proj, f"{a}.reset_resid_proj needs reset_linear"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid config: {msg}")


@dataclass
class Config:
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    outputs_dir: str = ""       # root of stage outputs ("" = $LLM4ALL_OUTPUTS or <repo>/outputs)
    corpus: str = "en/tinyshakespeare/input.txt"   # input text for the forward-error experiments
    threads: int = 1
    device: str = "cpu"   # forward-error stages: "cpu", "cuda" or "auto" (cuda when available); training is CPU
    depth: DepthConfig = field(default_factory=DepthConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    meanmedian: MeanMedianConfig = field(default_factory=MeanMedianConfig)
    accum: AccumConfig = field(default_factory=AccumConfig)
    hyper: HyperConfig = field(default_factory=HyperConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    authors: AuthorsSweepConfig = field(default_factory=AuthorsSweepConfig)

    def validate(self) -> None:
        for p in self.depth.precisions + self.depth.real_precisions + self.meanmedian.precisions + [
                self.hyper.precision]:
            if p not in PRECISIONS:
                raise ValueError(f"unknown precision '{p}'; known: {sorted(PRECISIONS)}")
        for p in self.estimate.precisions:
            if p not in PRECISIONS:
                raise ValueError(f"estimate.precisions: unknown '{p}'; known: {sorted(PRECISIONS)}")
        for a in self.estimate.archs:
            if a not in ("gpt2", "llama", "opt"):
                raise ValueError(f"estimate.archs: '{a}' not supported (gpt2, llama, opt)")
        if not self.estimate.depths or min(self.estimate.depths) < 1 or self.estimate.n_inits < 1:
            raise ValueError("estimate.depths must be >= 1 (non-empty) and estimate.n_inits >= 1")
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
        self.authors.validate()


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

"""Configs of the TOR experiment (dataclasses; YAML profiles in configs/{quick,paper}.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from exp_tor.harness.supervisor import HarnessConfig

STAGE_NAMES = ("closed", "simulate", "planning", "harness")   # the stages of run.py, in run order


@dataclass
class ClosedConfig:
    delta: float = 5.0                                   # minutes (Daly's worked examples)
    repair: float = 10.0
    mtbfs: list[float] = field(default_factory=lambda: [1440.0, 360.0, 15.0, 185.6])
    # how each MTBF is read: Daly's examples are the Poisson rate on the uptime clock; Llama 3's 54 d / 419
    # interruptions = 185.6 min is a wall-clock mean (repair included)
    mtbf_kinds: list[str] = field(default_factory=lambda: ["uptime", "uptime", "uptime", "wallclock"])
    curve_points: int = 40                               # TOR vs interval curve per MTBF


@dataclass
class SimConfig:
    n_cycles: int = 200_000
    taus: list[float] = field(default_factory=lambda: [10.0, 30.0, 90.0])
    mtbfs: list[float] = field(default_factory=lambda: [60.0, 180.0, 720.0])
    delta: float = 1.0
    repair: float = 10.0
    commit: float = 4.0                                  # async row: durable after `commit`
    weibull_shape: float = 0.7
    lognormal_sigma: float = 1.0
    # trace replay: CSV `time,kind[,rho,duration]` (seconds since job start); empty = none
    trace: str = ""
    trace_t_opt: float = 86400.0                         # work of the replayed job (s)
    trace_tau: float = 1800.0
    trace_delta: float = 60.0
    trace_repair: float = 600.0
    trace_policy: str = "tolerate"


@dataclass
class PlanningConfig:
    models: list[str] = field(default_factory=lambda: ["GPT-1.3B", "GPT-2.7B", "GPT-6.7B", "GPT-13B", "GPT-30B",
                                                       "GPT-70B"])
    params_b: list[float] = field(default_factory=lambda: [1.3, 2.7, 6.7, 13.0, 30.0, 70.0])
    gpus: list[int] = field(default_factory=lambda: [128, 128, 128, 256, 512, 512])
    tokens_per_param: float = 20.0
    peak_flops: float = 312e12                           # A100 bf16 dense
    mfu: float = 0.45
    usd_per_gpu_hour: float = 2.5
    gpus_per_node: int = 8
    failures_per_1000_node_days: float = 6.50            # Meta RSC-1, Kokolis et al. arXiv 2410.21680
    delta_s: float = 60.0                                # blocking checkpoint time
    repair_s: float = 600.0                              # restart overhead u0 (5-20 min there)
    cluster_sizes: list[int] = field(default_factory=lambda: [512, 2048, 8192, 16384, 32768, 131072])
    # failure-rate sensitivity: Meta's measured MTTF at one job size (Kokolis et al.: 7.9 h at 1,024 GPUs) as a
    # per-node rate, next to the planner's rate × each multiplier
    measured_mttf_h: float = 7.9
    measured_mttf_gpus: int = 1024
    rate_multipliers: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 5.0])


@dataclass
class HarnessStageConfig:
    job: HarnessConfig = field(default_factory=lambda: HarnessConfig(
        steps=1000, checkpoint_every=50, mtbf_s=6.0, repair_s=1.0, slow_mtbf_s=8.0, slow_duration_s=2.0,
        slow_rho=0.5, extra_checkpoint_delay_s=0.1))
    sweep_intervals: list[int] = field(default_factory=lambda: [10, 25, 50, 100, 200])
    sweep_steps: int = 800
    sweep_mtbf_s: float = 5.0
    sweep_fault_seeds: list[int] = field(default_factory=lambda: [1])
    sweep_restart: str = "warm"                 # sweep jobs restart warm: more faults per CPU minute
    sweep_parallel: int = 1                     # sweep jobs run at once (each trainer uses one thread)
    identity_tol: float = 0.05


@dataclass
class Config:
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES))
    outputs_dir: str = ""                      # stage outputs root ("" = $LLM4ALL_OUTPUTS or outputs/)
    closed: ClosedConfig = field(default_factory=ClosedConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    planning: PlanningConfig = field(default_factory=PlanningConfig)
    harness: HarnessStageConfig = field(default_factory=HarnessStageConfig)

    def validate(self) -> None:
        p = self.planning
        if not len(p.models) == len(p.params_b) == len(p.gpus):
            raise ValueError("keys planning.models, planning.params_b, planning.gpus must have equal lengths")
        if not 0 < p.mfu <= 1:
            raise ValueError(f"key 'planning.mfu' must be in (0, 1], got {p.mfu}")
        c = self.closed
        if len(c.mtbf_kinds) != len(c.mtbfs) or any(k not in ("uptime", "wallclock") for k in c.mtbf_kinds):
            raise ValueError("key 'closed.mtbf_kinds' must give 'uptime' or 'wallclock' for each of closed.mtbfs")
        if p.measured_mttf_h <= 0 or p.measured_mttf_gpus < 1 or not p.rate_multipliers \
                or min(p.rate_multipliers) <= 0:
            raise ValueError("keys 'planning.measured_mttf_h', 'planning.measured_mttf_gpus' and "
                             "'planning.rate_multipliers' must be positive (multipliers: a non-empty list)")
        if self.sim.n_cycles < 100:
            raise ValueError("key 'sim.n_cycles' must be >= 100")
        if self.sim.trace_policy not in ("tolerate", "ckpt_restart", "treat_as_stop"):
            raise ValueError(f"key 'sim.trace_policy': unknown policy '{self.sim.trace_policy}'")
        h = self.harness
        if not h.sweep_intervals or min(h.sweep_intervals) < 1:
            raise ValueError("key 'harness.sweep_intervals' must be a non-empty list of positive step counts")
        if h.sweep_restart not in ("cold", "warm") or h.job.restart not in ("cold", "warm"):
            raise ValueError("keys 'harness.sweep_restart' and 'harness.job.restart' must be 'cold' or 'warm'")
        if h.sweep_parallel < 1:
            raise ValueError("key 'harness.sweep_parallel' must be >= 1")
        if h.sweep_steps < 1 or h.job.steps < 1:
            raise ValueError("keys 'harness.sweep_steps' and 'harness.job.steps' must be >= 1")
        if self.sim.commit < self.sim.delta:
            raise ValueError("key 'sim.commit' must be >= sim.delta")

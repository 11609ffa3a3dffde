"""Config dataclasses of exp_plpp. The defaults are the CPU (quick) settings; ``configs/small.yaml`` and
``configs/paper.yaml`` hold only what differs from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import parse_field_overrides
from exp_plpp.learn import LearnConfig, parse_method
from exp_plpp.offline_clip import TowerConfig
from exp_plpp.plpp import PLPPConfig
from exp_plpp.pretrain import PretrainConfig
from exp_plpp.prompts import PromptConfig

STAGE_NAMES = ["testbed", "pretrain_clip", "features", "tune", "base2novel", "fewshot", "transfer", "ablations",
               "table"]
METHODS = ["zeroshot", "coop", "coop_plpp", "cocoop", "cocoop_plpp", "kgcoop", "kgcoop_plpp"]


def parse_ablation(spec: str) -> dict:
    """``"lambda_ppl=1,label_mode=hard"`` -> {"lambda_ppl": 1, "label_mode": "hard"}, checked against PLPPConfig."""
    return parse_field_overrides(spec, PLPPConfig, "protocol.ablations")


def parse_tune(spec: str) -> dict:
    """A ``protocol.tune`` candidate -> PLPPConfig overrides ({} for "default")."""
    return {} if spec.strip() == "default" else parse_field_overrides(spec, PLPPConfig, "protocol.tune")


@dataclass
class TestbedConfig:
    colours: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    pretrain_cap: int = 6000         # at most this many pretraining images per source (Fashion has 30k seen)
    p_val: float = 0.1               # fixed downstream splits (CoOp: split_zhou_*.json), seed-independent
    p_test: float = 0.5
    test_per_class: int = 40         # evaluation images per class (a fixed stratified subset; 0 = all)
    noise_sigma: float = 0.1        # DG target digits_noise (Gaussian, on the [0, 1] scale)
    blur_sigma: float = 1.0         # DG target digits_blur (Gaussian, pixels)


@dataclass
class ProtocolConfig:
    seeds: list[int] = field(default_factory=lambda: [1])
    methods: list[str] = field(default_factory=lambda: ["zeroshot", "coop", "coop_plpp"])
    fewshot_methods: list[str] = field(default_factory=list)   # few-shot and transfer; [] = methods
    fewshot_datasets: list[str] = field(default_factory=list)  # few-shot; [] = datasets
    cocoop_datasets: list[str] = field(default_factory=list)   # CoCoOp (costly: n_cls prompts per image) only
                                                               # on these; [] = every dataset
    datasets: list[str] = field(default_factory=lambda: ["digits", "shapes"])   # base2novel and fewshot
    b2n_shots: int = 16
    shots: list[int] = field(default_factory=lambda: [4, 16])
    transfer_source: str = "digits"  # its 16-shot all-class prompts are tested on the targets below
    xd_targets: list[str] = field(default_factory=lambda: ["fashion", "shapes"])
    dg_targets: list[str] = field(default_factory=lambda: ["usps", "sklearn_digits", "digits_noise", "digits_blur"])
    # base-to-novel runs of ``ablation_method`` with PLPP settings changed ("lambda_ppl=1,lambda_inv=1",
    # "label_mode=hard", "position=next"): keys of PLPPConfig; rows named e.g. coop_plpp[label_mode=hard]
    ablations: list[str] = field(default_factory=list)
    ablation_method: str = "coop_plpp"
    # PLPP's open weights chosen on the validation split, as CoOp-family papers tune per dataset: candidate
    # overrides of the plpp section ("lambda_ppl=0.5,lambda_inv=0.5"; "default" = the section as written), each
    # trained on the base classes' shots and scored on the base classes' validation images (novel classes never
    # seen); the best mean over seeds is used by base2novel, fewshot and transfer. [] = no tuning (stage tune
    # does nothing)
    tune: list[str] = field(default_factory=list)
    tune_methods: list[str] = field(default_factory=list)   # the PLPP methods tuned; [] = every one the run has

    def validate(self) -> None:
        for m in [*self.methods, *self.fewshot_methods]:
            parse_method(m)
        if not parse_method(self.ablation_method)[1]:
            raise ValueError(f"protocol.ablation_method must be a PLPP method, got '{self.ablation_method}'")
        for spec in self.ablations:
            parse_ablation(spec)
        for spec in self.tune:
            parse_tune(spec)
        for m in self.tune_methods:
            if not parse_method(m)[1]:
                raise ValueError(f"protocol.tune_methods: '{m}' is not a PLPP method (<method>_plpp)")
        if len(set(self.tune)) != len(self.tune):
            raise ValueError(f"protocol.tune has a candidate twice: {self.tune}")
        if not self.seeds or not self.methods:
            raise ValueError("protocol.seeds and protocol.methods must not be empty")
        if any(k < 1 for k in [*self.shots, self.b2n_shots]):
            raise ValueError("protocol: shots must be >= 1")


@dataclass
class Config:
    seed: int = 0                    # the testbed's colour draws and the CLIP pretraining
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES))
    outputs_dir: str = ""
    threads: int = 2                 # torch threads (a machine resource: not a hash key of any stage)
    clip: str = ""                   # real CLIP weights (hub ID or local folder, transformers CLIPModel); "" = the
                                     # offline CLIP trained by stage pretrain_clip
    coop_root: str = ""              # CoOp benchmark data root (split_zhou_*.json layout); "" = the offline testbed
    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    tower: TowerConfig = field(default_factory=TowerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    plpp: PLPPConfig = field(default_factory=PLPPConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)

    def validate(self) -> None:
        if self.coop_root and not self.clip:
            raise ValueError("coop_root needs clip (real CLIP weights): the offline CLIP sees 32 x 32 images only")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if not self.testbed.colours or len(set(self.testbed.colours)) != len(self.testbed.colours):
            raise ValueError("testbed.colours must be distinct and not empty")
        if not 0 < self.testbed.p_val + self.testbed.p_test < 1:
            raise ValueError("testbed.p_val + testbed.p_test must be in (0, 1)")
        self.pretrain.validate()
        self.prompt.validate()
        self.plpp.validate()
        self.learn.validate()
        self.protocol.validate()

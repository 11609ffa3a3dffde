"""Config dataclasses of exp_curriculum. The defaults are the CPU (quick) settings; the profiles
``configs/quick.yaml`` and ``configs/paper.yaml`` hold only the values that differ from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from exp_curriculum.corpus import CorpusConfig
from exp_curriculum.selection import MinHashConfig
from exp_curriculum.study import StudyConfig


@dataclass
class SemDedupConfig:
    enabled: bool = True
    max_docs: int = 2000        # documents embedded (first of a seeded shuffle); 0 = all
    max_length: int = 128       # encoder tokens per document
    n_clusters: int = 20
    eps: float = 0.05           # remove when max cosine similarity to an earlier item > 1 - eps
    d4_keep_fraction: float = 0.5


@dataclass
class ModelScoreConfig:
    enabled: bool = True
    model: str = "smollm2-135m-instruct"   # common.models.load_causal_lm name (offline alias or path)
    docs_per_language: int = 32            # ASK-LLM + perplexity are scored on a seeded sample
    max_doc_tokens: int = 192
    batch_size: int = 4


@dataclass
class DensityConfig:
    bandwidth: float = 0.5                 # Gaussian kernel on unit-norm MiniLM embeddings
    sample_fraction: float = 0.5


@dataclass
class DiversityConfig:
    enabled: bool = True
    probe: str = "smollm2-135m-instruct"
    n_batches: int = 4
    batch_size: int = 8
    seq_len: int = 64
    finetune_epochs: int = 1


STAGE_NAMES = ["metrics", "dedup", "model_scores", "diversity", "summary",
               "study_data", "study_reference", "study_select", "study_train", "study_table"]


@dataclass
class Config:
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES))
    outputs_dir: str = ""       # root of the stage folders ("" = $LLM4ALL_OUTPUTS or <repo>/outputs)
    # machine resources, not hash keys of any stage: changing them reuses the stages' outputs
    num_proc: int = 2           # worker processes of the metrics stage
    threads: int = 2            # torch threads of the dedup (MiniLM), model_scores and diversity stages
    n_length_buckets: int = 8
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    semdedup: SemDedupConfig = field(default_factory=SemDedupConfig)
    model_scores: ModelScoreConfig = field(default_factory=ModelScoreConfig)
    density: DensityConfig = field(default_factory=DensityConfig)
    diversity: DiversityConfig = field(default_factory=DiversityConfig)
    study: StudyConfig = field(default_factory=StudyConfig)     # part 2: the curriculum training study

    def validate(self) -> None:
        if self.num_proc < 1 or self.threads < 1:
            raise ValueError("num_proc and threads must be >= 1")
        self.corpus.validate()
        self.minhash.validate()
        if not 0 < self.semdedup.eps < 1 or not 0 < self.semdedup.d4_keep_fraction <= 1:
            raise ValueError("semdedup.eps must be in (0, 1) and semdedup.d4_keep_fraction in (0, 1]")
        if self.density.bandwidth <= 0 or not 0 < self.density.sample_fraction <= 1:
            raise ValueError("density.bandwidth must be > 0 and density.sample_fraction in (0, 1]")
        if self.diversity.n_batches < 2:
            raise ValueError("diversity.n_batches must be >= 2 (the coefficient is a mean over batch pairs)")
        self.study.validate()

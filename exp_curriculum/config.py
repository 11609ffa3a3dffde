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
    # D4 = MinHash survivors -> SemDeDup -> SSL prototypes. d4_dedup "ratio": SemDeDup's eps is chosen so that it
    # keeps the fraction d4_dedup_keep of the embedded MinHash survivors (the paper's R_dedup; 0.75 was its
    # best; 1 = prototypes alone); "eps": SemDeDup at the fixed eps above
    d4_dedup: str = "ratio"
    d4_dedup_keep: float = 0.75
    d4_keep_fraction: float = 0.5   # D4's final selection ratio, of the embedded MinHash survivors


@dataclass
class ModelScoreConfig:
    enabled: bool = True
    model: str = "smollm2-135m-instruct"   # common.models.load_causal_lm name (offline alias or path)
    docs_per_language: int = 32            # ASK-LLM + perplexity are scored on a seeded sample
    max_doc_tokens: int = 192
    batch_size: int = 4
    planted_docs: int = 8                  # per language: encyclopedia documents + as many planted bad ones
    #                                        (does raw or normalised ASK-LLM rank them right?); 0 = off


@dataclass
class DensityConfig:
    bandwidth: float = 0.5                 # Gaussian kernel on unit-norm MiniLM embeddings
    sample_fraction: float = 0.5


@dataclass
class DiversityConfig:
    """Task2Vec diversity coefficient (exp_curriculum/diversity.py). Unlike the other sections, the defaults
    are the reference's settings (alycialee/beyond-scale-language-data-diversity `main.py` + `task2vec.py`,
    the paper's table: 200 batches of 512 x 128 tokens), GPU-hours; configs/quick.yaml overrides them."""
    enabled: bool = True
    probe: str = "smollm2-135m-instruct"   # reference: pre-trained GPT-2 117M (not available offline)
    n_batches: int = 200                   # batches ("tasks") per corpus; 200 -> 19,900 pairs
    batch_size: int = 512                  # sequences per batch
    seq_len: int = 128                     # tokens: longer documents truncated, shorter ones right-padded
    micro_batch: int = 8                   # sequences per fine-tuning step and per Fisher gradient
    finetune_epochs: int = 10              # passes over the batch's micro-batches (head only, AdamW)
    finetune_steps: int = 0                # micro-batch steps per epoch; 0 = all (512 / 8 = 64)
    lr: float = 5e-5
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    fisher_batches: int = 0                # micro-batches averaged in the Fisher; 0 = all (64)
    untie_head: bool = False               # True: fine-tune a copy of the head, not the tied input embedding
    include_biases: bool = False           # reference: weights only (norm gains included, biases not)
    # deliberate differences from the reference; the other value restores it
    target_shift: bool = False             # True: logits at t scored on a token sampled at t+1 (reference)
    fisher_on_padding: bool = False        # True: padded positions count in the Fisher (reference)
    fresh_seed_per_batch: bool = True      # False: one seed for every batch (get_diversity_coefficient)
    # which documents a group's batches are drawn from
    max_docs: int = 2000                   # seeded sample of each group tokenised; 0 = all
    all_sampling: str = "uniform"          # a language's "all" group: uniform over its documents, or
                                           # "balanced" (each genre the same count while it lasts)

    def validate(self) -> None:
        if self.n_batches < 2:
            raise ValueError("diversity.n_batches must be >= 2 (the coefficient is a mean over batch pairs)")
        if min(self.batch_size, self.micro_batch) < 1 or self.seq_len < 2:
            raise ValueError("diversity.batch_size and micro_batch must be >= 1 and seq_len >= 2")
        if self.all_sampling not in ("uniform", "balanced"):
            raise ValueError(f"diversity.all_sampling must be uniform or balanced, got '{self.all_sampling}'")


@dataclass
class DecontamConfig:
    """Stage `decontam` (exp_curriculum/decontam_stage.py): documents sharing an n-gram with ARC / MMLU."""
    ngram: int = 13                 # common.decontam's GPT-3 convention
    arc_subsets: list[str] = field(default_factory=lambda: ["ARC-Easy", "ARC-Challenge"])
    arc_splits: list[str] = field(default_factory=lambda: ["train", "validation", "test"])  # absent ones skipped
    mmlu_splits: list[str] = field(default_factory=lambda: ["test"])
    # how an item is indexed (as exp_distill_data): question + choices, the lettered prompt, the question alone
    layouts: list[str] = field(default_factory=lambda: ["plain", "lettered", "question"])
    max_examples: int = 5           # contaminated document ids kept per group in decontam.json


STAGE_NAMES = ["metrics", "dedup", "decontam", "model_scores", "diversity", "summary",
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
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    model_scores: ModelScoreConfig = field(default_factory=ModelScoreConfig)
    density: DensityConfig = field(default_factory=DensityConfig)
    diversity: DiversityConfig = field(default_factory=DiversityConfig)
    study: StudyConfig = field(default_factory=StudyConfig)     # part 2: the curriculum training study

    def validate(self) -> None:
        if self.num_proc < 1 or self.threads < 1:
            raise ValueError("num_proc and threads must be >= 1")
        self.corpus.validate()
        self.minhash.validate()
        s = self.semdedup
        if not 0 < s.eps < 1 or not 0 < s.d4_keep_fraction <= 1 or not 0 < s.d4_dedup_keep <= 1:
            raise ValueError("semdedup.eps must be in (0, 1), semdedup.d4_keep_fraction and "
                             "semdedup.d4_dedup_keep in (0, 1]")
        if s.d4_dedup not in ("ratio", "eps"):
            raise ValueError(f"semdedup.d4_dedup must be 'ratio' or 'eps', got '{s.d4_dedup}'")
        d = self.decontam
        if d.ngram < 1 or not set(d.layouts) <= {"plain", "lettered", "question"} or not d.layouts:
            raise ValueError("decontam.ngram must be >= 1 and decontam.layouts a non-empty subset of "
                             "plain, lettered, question")
        if self.density.bandwidth <= 0 or not 0 < self.density.sample_fraction <= 1:
            raise ValueError("density.bandwidth must be > 0 and density.sample_fraction in (0, 1]")
        self.diversity.validate()
        self.study.validate()

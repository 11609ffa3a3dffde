"""The OPT-architecture *source* model of exp_distill_data (issue 12, item 2 "Models").

The paper distils with OPT-1.3B (arXiv 2504.09818). No OPT weights exist offline, so offline profiles
pretrain a small OPT-architecture model with our own code: a byte-level BPE tokenizer of our own (its
vocabulary differs from the Llama-family target's, so OPT -> Llama transfer genuinely needs
decode -> re-encode), trained on the local English text and the instruction pools flattened to text, so
the source has seen instruction-like data before its LoRA experts are trained.

    cfg = SourceConfig()                                    # quick; SourceConfig.for_profile("small")
    info = pretrain_source(cfg, out_dir, run=run)           # {"val_ppl", "unigram_ppl", ...}
    model, tok = load_causal_lm(info["model"])              # = str(out_dir / "model")

Data, deterministic given ``seed``: every source becomes documents (text files cut at paragraph
boundaries into pieces of about ``doc_chars``; one instruction example = one document), exact duplicates
are dropped, the documents are shuffled with ``seed`` and the first ``val_fraction`` of them are held out
for validation (never trained on, never seen by the tokenizer). Each split is tokenised, documents are
joined with EOS and the stream is cut into ``seq_len`` blocks; training draws ``token_budget`` tokens of
blocks (several epochs when the budget exceeds the data).

Reported: validation perplexity (exp of the mean next-token NLL over the validation blocks) and, as the
reference every real LM must beat, the perplexity of an add-one-smoothed unigram model estimated on the
training stream, scored on exactly the same validation targets.

Training goes through ``common.train.train``: checkpoints every ``checkpoint_every`` steps into
``out_dir/train``, and a killed run called again with the same arguments resumes from its last
checkpoint (the tokenizer is kept in ``out_dir/tokenizer`` and reused). In a stage, declare the stage
``resumable=True`` so its partial folder (and these checkpoints) survive a kill.

Paper profile: ``hub_id="facebook/opt-1.3b"`` (any ``load_causal_lm`` name or folder) skips pretraining;
the model is only scored on the same validation documents with its own tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.models import build_causal_lm, load_causal_lm, train_bpe_tokenizer
from common.train import TrainConfig, evaluate, hf_causal_lm_eval, train

EOS_TOKEN = "<|endoftext|>"   # id 0: build_causal_lm's bos/eos id
PAD_TOKEN = "<pad>"           # id 1: OPT's pad_token_id (its embedding row is the padding_idx)
TABLE = "source_pretrain"
CURVE_TABLE = "source_pretrain_curve"

DEFAULT_SOURCES = (
    "text:en/tinystories", "text:en/wikipedia", "text:en/gutenberg", "text:en/tinyshakespeare",
    "alpaca", "alpaca_gpt4", "lima", "self_instruct",
)
# Project Gutenberg files keep their licence header and footer; the body lies between these markers.
_PG_START = re.compile(r"^\s*\*\*\* ?START OF TH(E|IS) PROJECT GUTENBERG.*$", re.M)
_PG_END = re.compile(r"^\s*\*\*\* ?END OF TH(E|IS) PROJECT GUTENBERG.*$", re.M)


@dataclass
class SourceConfig:
    """Source-model settings. Defaults are the ``quick`` profile; ``PROFILES`` holds what ``small`` and
    ``paper`` change. Measured on the shared 2-core CPU (1 torch thread, other jobs running):
    quick 165 s (1.5 M parameters, 0.6 M tokens): val ppl 450 vs unigram 1117; small 27.5 min under
    heavy load (5.4 M parameters, 2 M tokens): val ppl 259 vs unigram 1124 (3 M tokens: 36.6 min, 204)."""

    arch: str = "opt"               # opt (the paper's family) | llama | gpt2 (build_causal_lm)
    hub_id: str = ""                # set (e.g. facebook/opt-1.3b, or a folder): load it, no pretraining
    vocab_size: int = 8192          # BPE vocabulary incl. the two special tokens
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ffn: int = 512
    max_seq_len: int = 512          # position embeddings; = seq_len so that every position is trained
    dropout: float = 0.0
    sources: tuple[str, ...] = DEFAULT_SOURCES  # common.data.load_named names: text:<path> or instruction pools
    instruct_template: str = "{prompt}\n{answer}"  # how an instruction example becomes a document
    doc_chars: int = 2000           # text files are cut into documents of about this many characters
    tokenizer_chars: int = 4_000_000  # BPE is trained on the first this-many characters of the training docs
    min_frequency: int = 2          # BPE merge threshold
    token_budget: int = 600_000     # training tokens (optimizer steps = budget / tokens per step)
    seq_len: int = 512              # tokens per training / validation block (SFTConfig.max_len is 512 too)
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-3
    lr_schedule: str = "wsd"        # wsd | cosine | linear | constant (common.train)
    warmup_ratio: float = 0.05
    decay_fraction: float = 0.2     # wsd: final decay phase
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"     # no | bf16 (GPU)
    cpu: bool = False               # force CPU even where CUDA is available
    val_fraction: float = 0.02      # documents held out for validation
    val_max_tokens: int = 32_768    # cap on validation tokens (0 = all held-out documents)
    eval_every: int = 100           # validation curve every k steps (0 = at the end only)
    checkpoint_every: int = 100     # steps between resumable checkpoints
    keep_train_state: bool = False  # keep out_dir/train checkpoints after a finished run
    log_every: int = 20
    seed: int = 0

    def validate(self) -> None:
        if self.arch not in ("opt", "llama", "gpt2"):
            raise ValueError(f"source.arch must be opt|llama|gpt2, got {self.arch!r}")
        if not self.hub_id and self.vocab_size < 260:
            raise ValueError(f"source.vocab_size must be >= 260 (256 bytes + specials), got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"source.d_model ({self.d_model}) must be divisible by source.n_heads ({self.n_heads})")
        if self.seq_len < 2 or self.seq_len > self.max_seq_len:
            raise ValueError(f"source.seq_len must be in [2, max_seq_len={self.max_seq_len}], got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"source.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.token_budget < 1 or self.doc_chars < 1:
            raise ValueError("source.token_budget and source.doc_chars must be >= 1")
        if not self.sources:
            raise ValueError("source.sources is empty")
        if "{prompt}" not in self.instruct_template or "{answer}" not in self.instruct_template:
            raise ValueError("source.instruct_template needs {prompt} and {answer}")
        self.train_config(1).validate()

    def tokens_per_step(self, num_processes: int = 1) -> int:
        return self.batch_size * self.grad_accum * num_processes * self.seq_len

    def max_steps(self, num_processes: int = 1) -> int:
        return max(1, math.ceil(self.token_budget / self.tokens_per_step(num_processes)))

    def train_config(self, max_steps: int) -> TrainConfig:
        return TrainConfig(max_steps=max_steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           lr=self.lr, weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                           lr_schedule=self.lr_schedule, decay_fraction=self.decay_fraction,
                           max_grad_norm=self.max_grad_norm, mixed_precision=self.mixed_precision,
                           checkpoint_every=self.checkpoint_every, keep_checkpoints=2,
                           log_every=self.log_every, seed=self.seed, eval_every=self.eval_every,
                           cpu=self.cpu)

    @classmethod
    def for_profile(cls, profile: str = "quick", **overrides: Any) -> SourceConfig:
        """The config of a named profile (``PROFILES``), with ``overrides`` on top."""
        if profile not in PROFILES:
            raise ValueError(f"unknown source profile {profile!r}; known: {', '.join(PROFILES)}")
        return cls(**{**PROFILES[profile], **overrides})


# What each profile changes from the dataclass defaults (the experiment's YAML profiles copy these).
# small: d_model 256 / 4 layers (5.4 M parameters with the tied 8192-row embedding), 2 M tokens.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {},
    "small": {"d_model": 256, "n_layers": 4, "n_heads": 4, "ffn": 1024, "token_budget": 2_000_000,
              "lr": 1.5e-3, "val_max_tokens": 65_536, "eval_every": 250},
    "paper": {"hub_id": "facebook/opt-1.3b", "batch_size": 8},
}


# ------------------------------------------------------------------------------------------ data
def split_text(text: str, doc_chars: int) -> list[str]:
    """Cut ``text`` into pieces of about ``doc_chars`` characters at the first paragraph break (else line
    break, else sentence end, else space) after each ``doc_chars`` mark; the pieces join back to ``text``."""
    pieces, start = [], 0
    while len(text) - start > doc_chars:
        mark = start + doc_chars
        window = text[mark:mark + doc_chars]  # look at most one more doc_chars ahead for a boundary
        for sep in ("\n\n", "\n", ". ", " "):
            at = window.find(sep)
            if at >= 0:
                cut = mark + at + len(sep)
                break
        else:
            cut = mark
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def strip_gutenberg(text: str) -> str:
    """A Project Gutenberg file's body, without the licence header and footer (unchanged if unmarked)."""
    start, end = _PG_START.search(text), _PG_END.search(text)
    if start is None or end is None or end.start() <= start.end():
        return text
    return text[start.end():end.start()]


def instruct_text(row: dict, template: str = "{prompt}\n{answer}") -> str:
    """An instruction example (instruction, input, output) as one document."""
    prompt = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
    return template.format(prompt=prompt, answer=row["output"])


def source_documents(cfg: SourceConfig) -> list[str]:
    """Every document of ``cfg.sources``, in source order (text files cut by ``split_text``)."""
    from common.data import load_named

    docs: list[str] = []
    for name in cfg.sources:
        ds = load_named(name)
        if "text" in ds.column_names:
            for text in ds["text"]:
                docs += [d for d in split_text(strip_gutenberg(text), cfg.doc_chars) if d.strip()]
        elif {"instruction", "output"} <= set(ds.column_names):
            docs += [instruct_text(r, cfg.instruct_template) for r in ds]
        else:
            raise ValueError(f"source '{name}': neither a text corpus nor an instruction pool "
                             f"(columns {ds.column_names})")
    return docs


def split_documents(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) documents: exact duplicates dropped (so no validation text is ever trained on),
    a seeded shuffle, the first ``val_fraction`` (at least one) held out. Both keep the shuffled order."""
    unique = list(dict.fromkeys(docs))
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(unique)))
    if n_val >= len(unique):
        raise ValueError(f"{len(unique)} distinct documents are too few to hold out {n_val} for validation")
    return [unique[i] for i in order[n_val:]], [unique[i] for i in order[:n_val]]


def prepare_documents(cfg: SourceConfig, documents: Sequence[str] | None = None,
                      eval_index: Any = None) -> tuple[list[str], list[str], int]:
    """(train docs, validation docs, number of contaminated docs dropped): ``documents`` (default: those
    of ``cfg.sources``), minus every document sharing an n-gram with ``eval_index`` (a
    ``common.decontam.EvalIndex`` of the held-out test sets, if given), split by ``split_documents``."""
    docs = list(documents) if documents is not None else source_documents(cfg)
    dropped = 0
    if eval_index is not None:
        from common.decontam import contaminated

        flags, _ = contaminated(docs, eval_index)
        dropped = sum(flags)
        docs = [d for d, bad in zip(docs, flags) if not bad]
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
    return train_docs, val_docs, dropped


def token_stream(tokenizer: Any, docs: Sequence[str], eos_id: int) -> np.ndarray:
    """The documents' tokens, each document followed by EOS (document boundaries the model can see)."""
    if not docs:
        return np.zeros(0, dtype=np.int64)
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    return np.concatenate([np.append(np.asarray(d, dtype=np.int64), eos_id) for d in ids])


def pack_blocks(stream: np.ndarray, seq_len: int, max_tokens: int = 0) -> torch.Tensor:
    """Consecutive ``seq_len`` blocks of the stream (the incomplete tail dropped; at most ``max_tokens``)."""
    n = len(stream) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    return torch.from_numpy(stream[:n * seq_len].reshape(n, seq_len).copy())


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length LM blocks as ``{"input_ids", "labels"}`` (labels = inputs; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def unigram_perplexity(train_stream: np.ndarray, val_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one unigram model of ``train_stream`` on the tokens a causal LM is scored on
    in ``val_blocks`` (every position but each block's first)."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts) - np.log(counts.sum())
    targets = val_blocks[:, 1:].reshape(-1).numpy()
    return float(np.exp(-logp[targets].mean()))


# ------------------------------------------------------------------------------------- tokenizer
def train_source_tokenizer(texts: Sequence[str], vocab_size: int, save_dir: str | Path | None = None,
                           min_frequency: int = 2):
    """Byte-level BPE (``common.models.train_bpe_tokenizer``) with EOS ``<|endoftext|>`` (id 0, also BOS and
    UNK) and PAD ``<pad>`` (id 1), the ids ``build_causal_lm`` gives the models; saved with
    ``save_pretrained`` when ``save_dir`` is given (written aside, then renamed: never half-written)."""
    tok = train_bpe_tokenizer(list(texts), vocab_size=vocab_size, min_frequency=min_frequency,
                              special_tokens=(EOS_TOKEN, PAD_TOKEN))
    tok.pad_token = PAD_TOKEN
    if (tok.eos_token_id, tok.pad_token_id) != (0, 1):  # the models' config relies on these ids
        raise RuntimeError(f"special token ids are eos={tok.eos_token_id}, pad={tok.pad_token_id}; expected 0, 1")
    if save_dir is not None:
        save_dir = Path(save_dir)
        tmp = save_dir.with_name(f".tmp-{save_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(save_dir, ignore_errors=True)
        os.replace(tmp, save_dir)
    return tok


def _first_chars(docs: Iterable[str], limit: int) -> list[str]:
    out, total = [], 0
    for d in docs:
        if limit and total >= limit:
            break
        out.append(d)
        total += len(d)
    return out


def _tokenizer_for(cfg: SourceConfig, train_docs: Sequence[str], folder: Path):
    """The run's tokenizer: trained on the training documents once (main process first), reused on resume."""
    from accelerate import PartialState
    from transformers import AutoTokenizer

    state = PartialState()
    with state.main_process_first():
        if state.is_main_process and not (folder / "tokenizer.json").is_file():
            train_source_tokenizer(_first_chars(train_docs, cfg.tokenizer_chars), cfg.vocab_size, folder,
                                   cfg.min_frequency)
        tok = AutoTokenizer.from_pretrained(folder)
    return tok


# -------------------------------------------------------------------------------------- pretrain
def _method(cfg: SourceConfig) -> str:
    return cfg.hub_id or f"{cfg.arch}-pretrained"


def _row_params(cfg: SourceConfig) -> dict[str, Any]:
    if cfg.hub_id:
        return {"model": cfg.hub_id, "seq_len": cfg.seq_len}
    return {"arch": cfg.arch, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "token_budget": cfg.token_budget, "seq_len": cfg.seq_len}


def _log_rows(run: Any, cfg: SourceConfig, info: dict, n_val: int) -> None:
    params = _row_params(cfg)
    for metric in ("val_ppl", "unigram_ppl"):
        run.log(table=TABLE, method=_method(cfg), metric=metric, value=info[metric], n=n_val, params=params)
    for metric in ("train_tokens", "params"):
        run.log(table=TABLE, method=_method(cfg), metric=metric, value=info[metric], params=params)


def pretrain_source(cfg: SourceConfig, out_dir: str | Path, run: Any = None,
                    documents: Sequence[str] | None = None, eval_index: Any = None,
                    callbacks: Iterable[Callable[[str, dict], None]] = ()) -> dict[str, Any]:
    """Pretrain (or, with ``cfg.hub_id``, only score) the source model; returns ``{"val_ppl",
    "unigram_ppl", "train_tokens", "params", "seconds", "model", "val_tokens", "steps"}``.

    ``documents`` replaces ``cfg.sources`` (tests, custom corpora); with ``eval_index`` (a
    ``common.decontam.EvalIndex`` of ARC-Easy / MMLU test) documents overlapping it are dropped first
    (``info["contaminated_docs"]``). The model and its tokenizer are saved
    with ``save_pretrained`` in ``out_dir/model`` (``info["model"]``, loadable by
    ``common.models.load_causal_lm``); with ``hub_id``, ``info["model"]`` is the hub ID and nothing is
    copied. With ``run`` (a ``common.results.Run`` or a stage context) the numbers become rows of table
    ``source_pretrain`` and the train/validation losses rows of ``source_pretrain_curve``. ``callbacks``
    go to ``common.train.train``. ``out_dir/source.json`` holds the returned dict.
    """
    from accelerate import PartialState

    cfg.validate()
    started = time.time()
    out_dir = Path(out_dir)
    state = PartialState()
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs, dropped = prepare_documents(cfg, documents, eval_index)

    if cfg.hub_id:
        model, tok = load_causal_lm(cfg.hub_id)
        model.to("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
        model_ref = cfg.hub_id
    else:
        tok = _tokenizer_for(cfg, train_docs, out_dir / "tokenizer")
        model_ref = str(out_dir / "model")
    eos = tok.eos_token_id
    train_stream = token_stream(tok, train_docs, eos)
    val_blocks = pack_blocks(token_stream(tok, val_docs, eos), cfg.seq_len, cfg.val_max_tokens)
    if val_blocks.shape[0] == 0:
        raise ValueError(f"the validation documents hold fewer than seq_len={cfg.seq_len} tokens; "
                         "raise source.val_fraction")
    val_ds = BlockDataset(val_blocks)
    unigram = unigram_perplexity(train_stream, val_blocks, len(tok))

    if cfg.hub_id:
        steps, train_tokens = 0, 0
        val_nll = evaluate(model, val_ds, hf_causal_lm_eval, cfg.batch_size)
    else:
        torch.manual_seed(cfg.seed)  # the initial weights (train() seeds only what comes after)
        model = build_causal_lm(cfg.arch, vocab_size=len(tok), d_model=cfg.d_model, n_layers=cfg.n_layers,
                                n_heads=cfg.n_heads, d_ff=cfg.ffn, max_seq_len=cfg.max_seq_len,
                                dropout=cfg.dropout)
        train_ds = BlockDataset(pack_blocks(train_stream, cfg.seq_len))
        steps = cfg.max_steps(state.num_processes)
        result = train(model, train_ds, cfg.train_config(steps), out_dir / "train", eval_dataset=val_ds,
                       run=run, curve_table=CURVE_TABLE, curve_method=_method(cfg),
                       curve_params=_row_params(cfg), callbacks=callbacks)
        model, val_nll = result.model, result.evals[-1][1]
        train_tokens = steps * cfg.tokens_per_step(state.num_processes)
        if state.is_main_process:
            _save_model(model, tok, out_dir / "model")
            if not cfg.keep_train_state:
                for ckpt in (out_dir / "train").glob("step_*"):
                    shutil.rmtree(ckpt, ignore_errors=True)
        state.wait_for_everyone()

    info = {"val_ppl": float(math.exp(val_nll)), "unigram_ppl": unigram, "train_tokens": int(train_tokens),
            "params": int(model.num_parameters()), "seconds": time.time() - started, "model": model_ref,
            "val_tokens": int(val_blocks[:, 1:].numel()), "steps": steps, "vocab_size": len(tok),
            "train_docs": len(train_docs), "val_docs": len(val_docs), "contaminated_docs": dropped}
    if state.is_main_process:
        (out_dir / "source.json").write_text(json.dumps({**info, "config": _jsonable_cfg(cfg)}, indent=1))
    if run is not None:
        _log_rows(run, cfg, info, info["val_tokens"])
    return info


def _save_model(model: torch.nn.Module, tok: Any, folder: Path) -> None:
    """save_pretrained of model and tokenizer into a side folder, then a rename (never half-written)."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _jsonable_cfg(cfg: SourceConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}

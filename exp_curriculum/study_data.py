"""Training data of the curriculum study: one BPE tokenizer for EN + FR, fixed-length sequences, their
difficulty scores, the held-out validation sets and the pools each arm trains on.

Unit of ordering: a sequence of exactly ``seq_len`` tokens. Documents of one source (in a seeded order,
each followed by EOS) are concatenated and cut into such sequences, the tail dropped, so every step sees
the same number of tokens whatever the order, and no length curriculum hides inside a content curriculum
(curriculum.md §4.3). Each sequence is scored on its own decoded text with part 1's metrics (the text the
model sees, not the document it came from). Validation documents are held out per language before
anything else and are never reordered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# difficulty metric -> (column of the sequence table, sign): higher sign * value = harder
METRICS: dict[str, tuple[str, float]] = {
    "compression": ("zstd_bits_per_byte", 1.0),    # less compressible = denser = harder
    "mtld": ("mtld", 1.0),                         # more lexical diversity = harder
    "flesch": ("fre", -1.0),                       # higher reading ease = easier
    "entropy": ("word1_bits_per_token", 1.0),      # unigram word entropy
    "perplexity": ("ref_nll", 1.0),                # reference-LM NLL (stage study_reference)
}


@dataclass
class StudyDataConfig:
    languages: list[str] = field(default_factory=lambda: ["en", "fr"])
    seq_len: int = 128               # tokens per sequence, fixed for every arm
    vocab_size: int = 4096           # byte-level BPE trained here on both languages
    tokenizer_docs: int = 2000       # training-side documents per language the tokenizer learns from
    val_sequences: int = 64          # held-out sequences per language (whole documents held out)
    reference_sequences: int = 512   # per language, reserved for the reference LM (perplexity difficulty)
    max_sequences: int = 0           # cap on candidate sequences per language (0 = all)
    dedup: bool = True               # drop part 1's MinHash near duplicates first

    def validate(self) -> None:
        if self.seq_len < 8 or self.vocab_size < 300:
            raise ValueError("study.data.seq_len must be >= 8 and study.data.vocab_size >= 300 (bytes + merges)")
        if min(self.val_sequences, self.tokenizer_docs) < 1 or self.reference_sequences < 0:
            raise ValueError("study.data.val_sequences and tokenizer_docs must be >= 1, reference_sequences >= 0")
        bad = set(self.languages) - {"en", "fr"}
        if bad or not self.languages:
            raise ValueError(f"study.data.languages must be a non-empty subset of [en, fr], got {self.languages}")


def chunk_stream(docs: list[list[int]], seq_len: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token lists (each followed by ``eos``) and cut into rows of ``seq_len``; the incomplete
    tail is dropped. Returns (sequences [n, seq_len], index of the document each sequence starts in)."""
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    flat = np.fromiter((t for d in docs for t in (*d, eos)), dtype=np.int64, count=int(lengths.sum()))
    n = len(flat) // seq_len
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    first_doc = np.searchsorted(starts, np.arange(n) * seq_len, side="right") - 1
    return flat[: n * seq_len].reshape(n, seq_len), first_doc


def hold_out(df: pd.DataFrame, token_counts: np.ndarray, need: int, seed: int) -> np.ndarray:
    """Boolean mask of whole documents (seeded order) held out until they hold ``need`` tokens."""
    order = np.random.default_rng(seed).permutation(len(df))
    cum = np.cumsum(token_counts[order] + 1)
    k = int(np.searchsorted(cum, need)) + 1
    mask = np.zeros(len(df), dtype=bool)
    mask[order[:k]] = True
    return mask


def build_sequences(docs: pd.DataFrame, tokenizer, cfg: StudyDataConfig, seed: int) -> dict:
    """Sequences of every language: validation (held-out documents), reference and candidates.

    ``docs``: columns id, text, language, source, genre. Returns {"val": {lang: array}, "table": one row per
    non-validation sequence (language, source, genre, doc id, role), "sequences": array aligned with it}.
    """
    eos = tokenizer.eos_token_id
    val, tables, seqs = {}, [], []
    for lang in cfg.languages:
        d = docs[docs["language"] == lang].reset_index(drop=True)
        if d.empty:
            raise ValueError(f"no documents in language '{lang}' (study.data.languages)")
        ids = tokenizer(d["text"].tolist(), add_special_tokens=False)["input_ids"]
        counts = np.array([len(x) for x in ids])
        held = hold_out(d, counts, cfg.val_sequences * cfg.seq_len + cfg.seq_len, seed)
        v, _ = chunk_stream([ids[i] for i in np.flatnonzero(held)], cfg.seq_len, eos)
        val[lang] = v[: cfg.val_sequences]
        rng = np.random.default_rng([seed, 1])
        for source, g in d[~held].groupby("source", sort=True):
            rows = rng.permutation(g.index.to_numpy())
            s, first = chunk_stream([ids[i] for i in rows], cfg.seq_len, eos)
            if len(s) == 0:
                continue
            seqs.append(s)
            tables.append(pd.DataFrame({"language": lang, "source": source, "genre": g["genre"].iloc[0],
                                        "doc_id": d["id"].to_numpy()[rows[first]]}))
    table = pd.concat(tables, ignore_index=True)
    sequences = np.concatenate(seqs)
    table["role"] = "candidate"
    rng = np.random.default_rng([seed, 2])
    keep = np.ones(len(table), dtype=bool)
    for lang in cfg.languages:
        idx = rng.permutation(np.flatnonzero(table["language"].to_numpy() == lang))
        ref = idx[: cfg.reference_sequences]
        if len(idx) - len(ref) < 1:
            raise ValueError(f"language '{lang}': no candidate sequence left after {len(ref)} reference ones")
        table.loc[ref, "role"] = "reference"
        if cfg.max_sequences:
            keep[idx[cfg.reference_sequences + cfg.max_sequences:]] = False
    table, sequences = table[keep].reset_index(drop=True), sequences[keep]
    return {"val": val, "table": table, "sequences": sequences}


def score_sequences(texts: list[str], languages: list[str], num_proc: int) -> pd.DataFrame:
    """Part 1's model-free metrics of each sequence's decoded text."""
    from datasets import Dataset

    from exp_curriculum.metrics import score_dataset

    ds = Dataset.from_dict({"text": texts, "language": languages})
    cols = [c for c, _ in METRICS.values() if c != "ref_nll"]
    scored = score_dataset(ds, num_proc=num_proc)
    return pd.DataFrame({c: np.asarray(scored[c], dtype=np.float64) for c in cols})


def difficulty_scores(table: pd.DataFrame, metric: str) -> np.ndarray:
    """Signed raw score of ``metric`` per sequence (higher = harder); NaN/inf become the language median
    (e.g. FRE of a sequence without a sentence), so every sequence has a place in the order."""
    if metric not in METRICS:
        raise ValueError(f"unknown difficulty metric '{metric}': expected one of {', '.join(METRICS)}")
    col, sign = METRICS[metric]
    if col not in table:
        raise ValueError(f"difficulty metric '{metric}' needs column '{col}' (stage study_reference for ref_nll)")
    s = sign * table[col].to_numpy(dtype=np.float64)
    s = np.where(np.isfinite(s), s, np.nan)
    for lang in table["language"].unique():
        m = table["language"].to_numpy() == lang
        med = np.nanmedian(s[m]) if np.isfinite(s[m]).any() else 0.0
        s[m & np.isnan(s)] = med
    return s


def save_arrays(folder: Path, built: dict) -> None:
    """sequences.npy (uint16 when the vocabulary fits), val_<lang>.npy, sequences.parquet."""
    dtype = np.uint16 if built["sequences"].max(initial=0) < 2 ** 16 else np.int32
    np.save(folder / "sequences.npy", built["sequences"].astype(dtype))
    for lang, v in built["val"].items():
        np.save(folder / f"val_{lang}.npy", v.astype(dtype))
    built["table"].to_parquet(folder / "sequences.parquet")

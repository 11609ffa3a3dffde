"""Named datasets as ``datasets.Dataset``s: ARC, MMLU, instruction pools and text corpora.

Resolution order for every name: the local data root (``$LLM4ALL_DATA``, ``--data-dir`` or
``../shared/data``), then the Hugging Face Hub where it is reachable, else DatasetNotAvailableError
naming the dataset and how to get it. Rows are validated on load; a bad row raises
DataValidationError naming file and line.

    ds = load_named("arc_easy", split="test")            # question, choices, labels, answer, id
    ds = load_named("mmlu", split="dev", subjects=["anatomy"])
    ds = load_named("alpaca")                            # instruction, input, output
    ds = load_named("text:en/tinyshakespeare")           # text, source, language, file
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common import paths
from common.config import default_data_dir

log = logging.getLogger(__name__)
MMLU_SPLITS = {"dev": "dev", "validation": "val", "val": "val", "test": "test"}
ARC_SPLITS = {"train": "Train", "validation": "Dev", "dev": "Dev", "test": "Test"}
LETTERS = "ABCDEFGHIJ"


class DatasetNotAvailableError(FileNotFoundError):
    """Neither the local data root nor the hub can provide a dataset."""


class DataValidationError(ValueError):
    """A row of a data file is malformed; the message names the file and line."""


def data_root(required: bool = True) -> Path | None:
    root = default_data_dir()
    if root is None and required:
        raise DatasetNotAvailableError(
            "no offline data root: set LLM4ALL_DATA=/path/to/shared/data or pass --data-dir "
            "(the Makefile sets it to ../shared/data when that folder exists)")
    return root


def _from_hub(name: str, loader: Callable[[], Any], how: str):
    if paths.hub_offline():
        raise DatasetNotAvailableError(f"dataset '{name}' is not under the local data root and the hub is "
                                       f"disabled (HF_HUB_OFFLINE=1). {how}")
    try:
        return loader()
    except Exception as exc:  # any hub/network failure becomes one clear message
        raise DatasetNotAvailableError(f"dataset '{name}': not under the local data root and the hub "
                                       f"failed ({type(exc).__name__}: {exc}). {how}") from None


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataValidationError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None


def validate_mc_row(row: dict, where: str) -> dict:
    """Multiple-choice invariants: non-empty question, >= 2 non-empty choices, answer index in range."""
    if not str(row.get("question", "")).strip():
        raise DataValidationError(f"{where}: empty question")
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataValidationError(f"{where}: needs at least 2 choices, got {choices!r}")
    if any(not str(c).strip() for c in choices):
        raise DataValidationError(f"{where}: empty answer choice in {choices!r}")
    ans = row.get("answer")
    if not isinstance(ans, int) or not 0 <= ans < len(choices):
        raise DataValidationError(f"{where}: answer {row.get('answer_key', ans)!r} is not one of the "
                                  f"choice labels {row.get('labels', list(LETTERS[:len(choices)]))}")
    return row


def _arc_row(raw: dict, where: str) -> dict:
    if isinstance(raw.get("question"), dict):  # original AI2 layout
        q = raw["question"]
        opts = q.get("choices", [])
        question, key = q.get("stem", ""), raw.get("answerKey")
    else:  # HF export layout (question string, options, answer)
        opts = raw.get("options") or raw.get("choices") or []
        question, key = raw.get("question", ""), raw.get("answer", raw.get("answerKey"))
    labels = [str(o.get("label")) for o in opts]
    choices = [str(o.get("text", "")) for o in opts]
    row = {"id": str(raw.get("id", "")), "question": question, "choices": choices, "labels": labels,
           "answer_key": str(key), "answer": labels.index(str(key)) if str(key) in labels else -1}
    return validate_mc_row(row, where)


def load_arc(subset: str = "ARC-Easy", split: str = "test"):
    import datasets

    if split not in ARC_SPLITS:
        raise ValueError(f"ARC split must be one of {sorted(ARC_SPLITS)}, got '{split}'")
    root = data_root(required=False)
    folder = root / "arc" / subset if root else None
    if folder is not None and folder.is_dir():
        stem = f"{subset}-{ARC_SPLITS[split]}"
        candidates = sorted(folder.glob(f"{stem}*.jsonl"))
        if not candidates:
            raise DatasetNotAvailableError(f"{subset} split '{split}': no {stem}*.jsonl in {folder}")
        path = candidates[0]
        rows = [_arc_row(raw, f"{path}:{n}") for n, raw in _jsonl(path)]
        return datasets.Dataset.from_list(rows)
    return _from_hub(subset.lower().replace("-", "_"), lambda: _arc_from_hub(subset, split),
                     "Put the AI2 ARC jsonl files under $LLM4ALL_DATA/arc/<subset>/ (see shared/data/MANIFEST.md).")


def _arc_from_hub(subset: str, split: str):
    import datasets

    ds = datasets.load_dataset("allenai/ai2_arc", subset, split=split)
    rows = [validate_mc_row({"id": r["id"], "question": r["question"], "choices": r["choices"]["text"],
                             "labels": r["choices"]["label"], "answer_key": r["answerKey"],
                             "answer": r["choices"]["label"].index(r["answerKey"])}, f"hub {subset}/{split}#{i}")
            for i, r in enumerate(ds)]
    return datasets.Dataset.from_list(rows)


def mmlu_subjects(split: str = "test") -> list[str]:
    folder = data_root() / "mmlu" / MMLU_SPLITS[split]
    return sorted(p.stem.rsplit("_", 1)[0] for p in folder.glob("*.csv"))


def load_mmlu(split: str = "test", subjects: list[str] | str | None = None):
    import datasets

    if split not in MMLU_SPLITS:
        raise ValueError(f"MMLU split must be one of {sorted(MMLU_SPLITS)}, got '{split}'")
    root = data_root(required=False)
    folder = root / "mmlu" / MMLU_SPLITS[split] if root else None
    if folder is None or not folder.is_dir():
        return _from_hub("mmlu", lambda: _mmlu_from_hub(split, subjects),
                         "Put the MMLU release CSVs under $LLM4ALL_DATA/mmlu/{dev,val,test}/.")
    available = sorted(p.stem.rsplit("_", 1)[0] for p in folder.glob("*.csv"))
    wanted = available if subjects is None else ([subjects] if isinstance(subjects, str) else list(subjects))
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise DatasetNotAvailableError(f"MMLU {split}: unknown subject(s) {unknown} in {folder}")
    rows = []
    for subject in wanted:
        path = folder / f"{subject}_{MMLU_SPLITS[split]}.csv"
        with path.open(encoding="utf-8", newline="") as f:
            for lineno, rec in enumerate(csv.reader(f), 1):
                where = f"{path}:{lineno}"
                if len(rec) != 6:
                    raise DataValidationError(f"{where}: expected 6 columns (question,A,B,C,D,answer), "
                                              f"got {len(rec)}")
                key = rec[5].strip()
                row = {"id": f"{subject}/{split}/{lineno}", "subject": subject, "question": rec[0],
                       "choices": rec[1:5], "labels": list("ABCD"), "answer_key": key,
                       "answer": "ABCD".index(key) if key in ("A", "B", "C", "D") else -1}
                rows.append(validate_mc_row(row, where))
    return datasets.Dataset.from_list(rows)


def _mmlu_from_hub(split: str, subjects: list[str] | str | None):
    import datasets

    hub_split = {"dev": "dev", "val": "validation", "validation": "validation", "test": "test"}[split]
    ds = datasets.load_dataset("cais/mmlu", "all", split=hub_split)
    if subjects is not None:
        keep = {subjects} if isinstance(subjects, str) else set(subjects)
        ds = ds.filter(lambda r: r["subject"] in keep)
    return ds.map(lambda r, i: {"id": f"{r['subject']}/{split}/{i}", "labels": list("ABCD"),
                                "answer_key": "ABCD"[r["answer"]]}, with_indices=True)


INSTRUCT_FILES = {
    "alpaca": "instruct/alpaca/alpaca_5000.json",
    "alpaca_gpt4": "instruct/alpaca/alpaca_gpt4_en_demo_999.json",
    "lima": "instruct/lima/lima_llamafactory.json",
    "self_instruct": "instruct/self_instruct/seed_tasks.jsonl",
}


def load_instruct(name: str, invalid: str = "drop"):
    """An instruction pool as rows of (instruction, input, output, source).

    ``invalid="drop"`` skips rows with an empty instruction/output with a warning naming them (the
    Alpaca sample has two such rows); ``"raise"`` stops at the first one.
    """
    import datasets

    root = data_root()
    path = root / INSTRUCT_FILES[name]
    if not path.is_file():
        raise DatasetNotAvailableError(f"instruction pool '{name}': missing file {path}")
    rows, dropped = [], []
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataValidationError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        items = [(i + 1, r) for i, r in enumerate(records)]
    else:  # self-instruct seeds: one task per line with instances
        items = [(n, {"instruction": r["instruction"], "input": r["instances"][0]["input"],
                      "output": r["instances"][0]["output"]}) for n, r in _jsonl(path)]
    for n, r in items:
        where = f"{path}:{'record ' if path.suffix == '.json' else ''}{n}"
        if not str(r.get("instruction", "")).strip() or not str(r.get("output", "")).strip():
            if invalid == "raise":
                raise DataValidationError(f"{where}: empty instruction or output")
            dropped.append(where)
            continue
        rows.append({"instruction": r["instruction"], "input": r.get("input", "") or "",
                     "output": r["output"], "source": name})
    if dropped:
        log.warning("instruction pool '%s': dropped %d row(s) with empty instruction/output: %s",
                    name, len(dropped), "; ".join(dropped[:5]))
    return datasets.Dataset.from_list(rows)


TEXT_LANG = {"en": "en", "fr": "fr", "parallel": None}


def load_text(name: str):
    """Text files under ``$LLM4ALL_DATA/text/<name>`` (a file or folder, e.g. ``en/tinyshakespeare``),
    one row per file: text, source, language, file."""
    import datasets

    root = data_root()
    target = root / "text" / name
    if target.is_dir():
        files = sorted(p for p in target.rglob("*") if p.is_file() and p.suffix in (".txt", ".tokens"))
    elif target.is_file():
        files = [target]
    else:
        known = sorted(str(p.relative_to(root / "text")) for p in (root / "text").glob("*/*") if p.is_dir())
        raise DatasetNotAvailableError(f"text corpus '{name}': no {target}; known: {', '.join(known)}")
    if not files:
        raise DatasetNotAvailableError(f"text corpus '{name}': no .txt/.tokens files under {target}")
    rows = []
    for p in files:
        rel = p.relative_to(root / "text")
        lang = TEXT_LANG.get(rel.parts[0]) or ("fr" if p.stem.endswith("_fr") else "en")
        rows.append({"text": p.read_text(encoding="utf-8", errors="strict"), "source": rel.parts[1]
                     if len(rel.parts) > 2 else rel.stem, "language": lang, "file": str(rel)})
    return datasets.Dataset.from_list(rows)


REGISTRY: dict[str, Callable[..., Any]] = {
    "arc_easy": lambda split="test", **kw: load_arc("ARC-Easy", split),
    "arc_challenge": lambda split="test", **kw: load_arc("ARC-Challenge", split),
    "mmlu": lambda split="test", subjects=None, **kw: load_mmlu(split, subjects),
    **{name: (lambda name=name, **kw: load_instruct(name)) for name in INSTRUCT_FILES},
}


def load_named(name: str, **kwargs: Any):
    """Load a registered dataset (see REGISTRY) or a text corpus (``text:<path under text/>``)."""
    if name.startswith("text:"):
        return load_text(name[len("text:"):])
    if name not in REGISTRY:
        raise KeyError(f"unknown dataset '{name}'; registered: {', '.join(sorted(REGISTRY))}, text:<path>")
    return REGISTRY[name](**kwargs)

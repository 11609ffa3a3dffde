"""Named datasets as ``datasets.Dataset``s: ARC, MMLU, instruction pools and text corpora.

Resolution order for every name: the local data root (``$LLM4ALL_DATA``, ``--data-dir`` or
``../shared/data``), then the Hugging Face Hub where it is reachable, else DatasetNotAvailableError
naming the dataset and how to get it. Rows are validated on load; a bad row raises
DataValidationError naming file and line.

    ds = load_named("arc_easy", split="test")            # question, choices, labels, answer, id
    ds = load_named("mmlu", split="dev", subjects=["anatomy"])
    ds = load_named("mmlu_auxiliary_train")              # MMLU's auxiliary_train (local copy: partial)
    ds = load_named("alpaca")                            # instruction, input, output
    ds = load_named("text:en/tinyshakespeare")           # text, source, language, file
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
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
    """A row of a data file is malformed (or the file is not UTF-8); the message names the file and line."""


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


def read_text(path: Path) -> str:
    """A (possibly gzipped) UTF-8 file's text; bytes that are not UTF-8 raise DataValidationError
    naming the file, the line and the offending byte (not a bare UnicodeDecodeError)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataValidationError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                                  f"{exc.start}: {exc.reason}); re-encode the file as UTF-8") from None


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    # split on "\n" only: str.splitlines would also split inside strings holding U+2028 and friends
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataValidationError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None


def _lines(start: int, end: int) -> str:
    return f"line {start}" if end <= start else f"lines {start}-{end}"


def _csv_records(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(record number, "record N (line L)" or "record N (lines L-M)", fields) for each non-empty CSV record.
    Quoted fields can span lines (42 MMLU release files have them), so record numbers and physical lines
    differ; errors cite the record and every physical line it covers (csv.reader's line_num is the last)."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    number, next_line = 0, 1
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataValidationError(f"{path}: record {number + 1} ({_lines(next_line, reader.line_num)}): "
                                      f"bad CSV ({exc})") from None
        start, next_line = next_line, reader.line_num + 1
        if not rec:  # blank line
            continue
        number += 1
        yield number, f"{path}: record {number} ({_lines(start, reader.line_num)})", rec


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
        rows += _mmlu_csv(folder / f"{subject}_{MMLU_SPLITS[split]}.csv", subject, f"{subject}/{split}")
    return datasets.Dataset.from_list(rows)


def _mmlu_csv(path: Path, subject: str, id_prefix: str) -> list[dict]:
    """Rows of one MMLU-release CSV (question,A,B,C,D,answer; no header); ids count records."""
    rows = []
    for number, where, rec in _csv_records(path):
        if len(rec) != 6:
            raise DataValidationError(f"{where}: expected 6 columns (question,A,B,C,D,answer), got {len(rec)}")
        key = rec[5].strip()
        row = {"id": f"{id_prefix}/{number}", "subject": subject, "question": rec[0], "choices": rec[1:5],
               "labels": list("ABCD"), "answer_key": key,
               "answer": "ABCD".index(key) if key in ("A", "B", "C", "D") else -1}
        rows.append(validate_mc_row(row, where))
    return rows


MMLU_AUX_FOLDERS = ("auxiliary_train", "auxiliary_train_partial")  # the full release, or the local part


def load_mmlu_auxiliary_train(files: list[str] | str | None = None):
    """MMLU's auxiliary_train (multiple-choice questions from ARC, MCTest, OBQA, RACE, ... released with
    MMLU for fine-tuning), same columns as ``load_mmlu``; ``subject`` is the source file's stem.

    The offline copy (``mmlu/auxiliary_train_partial``) holds 2 of the 8 release files
    (science_elementary, science_middle: 1,218 rows; see shared/data/MANIFEST.md); a full
    ``mmlu/auxiliary_train`` folder is used when present. ``files`` picks file stems.
    """
    import datasets

    root = data_root(required=False)
    folder = next((root / "mmlu" / name for name in MMLU_AUX_FOLDERS
                   if root is not None and (root / "mmlu" / name).is_dir()), None)
    if folder is None:
        return _from_hub("mmlu_auxiliary_train", _mmlu_aux_from_hub,
                         "Put the MMLU release's auxiliary_train CSVs under $LLM4ALL_DATA/mmlu/auxiliary_train/.")
    available = sorted(p.stem for p in folder.glob("*.csv"))
    wanted = available if files is None else ([files] if isinstance(files, str) else list(files))
    unknown = sorted(set(wanted) - set(available))
    if unknown or not wanted:
        raise DatasetNotAvailableError(f"MMLU auxiliary_train: unknown or no file(s) {unknown} in {folder}; "
                                       f"available: {', '.join(available)}")
    if folder.name.endswith("_partial"):
        log.info("MMLU auxiliary_train: partial local copy, %d file(s) from %s", len(available), folder)
    rows = []
    for stem in wanted:
        rows += _mmlu_csv(folder / f"{stem}.csv", stem, f"auxiliary_train/{stem}")
    return datasets.Dataset.from_list(rows)


def _mmlu_aux_from_hub():
    import datasets

    ds = datasets.load_dataset("cais/mmlu", "auxiliary_train", split="train")
    if "train" in ds.column_names:  # some revisions nest each row under a "train" struct column
        ds = ds.map(lambda r: r["train"], remove_columns=ds.column_names)
    return ds.map(lambda r, i: {"id": f"auxiliary_train/hub/{i + 1}", "labels": list("ABCD"),
                                "answer_key": "ABCD"[r["answer"]]}, with_indices=True)


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
    Alpaca sample has two such rows); ``"raise"`` stops at the first one. A self-instruct task without
    an ``instances`` list of {input, output} objects always raises DataValidationError naming file and
    line: it is a broken file (every task of the release has instances), not a row to drop silently.
    """
    import datasets

    root = data_root()
    path = root / INSTRUCT_FILES[name]
    if not path.is_file():
        raise DatasetNotAvailableError(f"instruction pool '{name}': missing file {path}")
    rows, dropped = [], []
    if path.suffix == ".json":
        try:
            records = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise DataValidationError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        items = [(i + 1, r) for i, r in enumerate(records)]
    else:  # self-instruct seeds: one task per line with instances
        items = [(n, _self_instruct_row(r, f"{path}:{n}")) for n, r in _jsonl(path)]
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


def _self_instruct_row(task: dict, where: str) -> dict:
    """A self-instruct seed task's first instance as (instruction, input, output)."""
    instances = task.get("instances")
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise DataValidationError(f"{where}: self-instruct task needs a non-empty 'instances' list of "
                                  f"{{input, output}} objects, got {instances!r}")
    first = instances[0]
    if "output" not in first:
        raise DataValidationError(f"{where}: instance 1 has no 'output' (keys: {sorted(first)})")
    return {"instruction": task.get("instruction", ""), "input": first.get("input", ""), "output": first["output"]}


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
        rows.append({"text": read_text(p), "source": rel.parts[1]
                     if len(rel.parts) > 2 else rel.stem, "language": lang, "file": str(rel)})
    return datasets.Dataset.from_list(rows)


REGISTRY: dict[str, Callable[..., Any]] = {
    "arc_easy": lambda split="test", **kw: load_arc("ARC-Easy", split),
    "arc_challenge": lambda split="test", **kw: load_arc("ARC-Challenge", split),
    "mmlu": lambda split="test", subjects=None, **kw: load_mmlu(split, subjects),
    "mmlu_auxiliary_train": lambda split="train", files=None, **kw: _aux_train(split, files),
    **{name: (lambda name=name, **kw: load_instruct(name)) for name in INSTRUCT_FILES},
}


def _aux_train(split: str, files: list[str] | str | None):
    if split != "train":
        raise ValueError(f"mmlu_auxiliary_train has only the split 'train', got '{split}'")
    return load_mmlu_auxiliary_train(files)


def load_named(name: str, **kwargs: Any):
    """Load a registered dataset (see REGISTRY) or a text corpus (``text:<path under text/>``)."""
    if name.startswith("text:"):
        return load_text(name[len("text:"):])
    if name not in REGISTRY:
        raise KeyError(f"unknown dataset '{name}'; registered: {', '.join(sorted(REGISTRY))}, text:<path>")
    return REGISTRY[name](**kwargs)

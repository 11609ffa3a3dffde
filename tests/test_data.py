"""common.data: real ARC/MMLU/instruction/text loading, validation errors with file:line, resolution."""

from __future__ import annotations

import json

import pytest

from common import data
from common.data import DatasetNotAvailableError, DataValidationError, load_named


def test_real_arc_and_mmlu_counts(data_root):
    # split sizes from shared/data/MANIFEST.md
    assert len(load_named("arc_easy", split="test")) == 2376
    assert len(load_named("arc_easy", split="validation")) == 570
    assert len(load_named("arc_challenge", split="test")) == 1172  # HF-export layout, normalised
    row = load_named("arc_easy", split="train")[0]
    assert row["labels"][row["answer"]] == row["answer_key"] and len(row["choices"]) >= 3
    dev = load_named("mmlu", split="dev")
    assert len(dev) == 285 and len(set(dev["subject"])) == 57
    anat = load_named("mmlu", split="validation", subjects="anatomy")
    assert len(anat) == 14 and set(anat["answer"]) <= {0, 1, 2, 3}


def test_instruction_pools_and_text(data_root):
    alpaca = load_named("alpaca")
    assert len(alpaca) == 4998  # 5000 minus the two rows with an empty output (warned, by record)
    assert len(load_named("lima")) == 1029
    fr = load_named("text:fr/gutenberg")
    assert set(fr["language"]) == {"fr"} and len(fr) == 8
    assert "Valjean" in " ".join(fr["text"])


def _with_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM4ALL_DATA", str(tmp_path))
    return tmp_path


def test_arc_validation_names_file_and_line(monkeypatch, tmp_path):
    root = _with_root(monkeypatch, tmp_path)
    folder = root / "arc" / "ARC-Easy"
    folder.mkdir(parents=True)
    good = {"id": "q1", "question": {"stem": "2+2?", "choices": [{"text": "4", "label": "A"},
                                                                 {"text": "5", "label": "B"}]}, "answerKey": "A"}
    bad = {**good, "id": "q2", "answerKey": "E"}
    (folder / "ARC-Easy-Test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataValidationError, match=r"ARC-Easy-Test.jsonl:2: answer 'E' is not one of"):
        load_named("arc_easy", split="test")
    (folder / "ARC-Easy-Test.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataValidationError, match=r"ARC-Easy-Test.jsonl:2: invalid JSON"):
        load_named("arc_easy", split="test")
    empty_q = {**good, "question": {**good["question"], "stem": "  "}}
    (folder / "ARC-Easy-Test.jsonl").write_text(json.dumps(empty_q) + "\n")
    with pytest.raises(DataValidationError, match=r":1: empty question"):
        load_named("arc_easy", split="test")


def test_mmlu_validation_names_file_and_line(monkeypatch, tmp_path):
    root = _with_root(monkeypatch, tmp_path)
    (root / "mmlu" / "dev").mkdir(parents=True)
    (root / "mmlu" / "dev" / "toy_dev.csv").write_text("Q1,a,b,c,d,A\nQ2,a,b,c,d,F\n")
    with pytest.raises(DataValidationError, match=r"toy_dev.csv:2: answer 'F'"):
        load_named("mmlu", split="dev")
    (root / "mmlu" / "dev" / "toy_dev.csv").write_text("Q1,a,b,c,A\n")
    with pytest.raises(DataValidationError, match=r"toy_dev.csv:1: expected 6 columns"):
        load_named("mmlu", split="dev")
    with pytest.raises(DatasetNotAvailableError, match="unknown subject"):
        load_named("mmlu", split="dev", subjects=["astrology"])


def test_missing_dataset_without_hub_says_how_to_get_it(monkeypatch, tmp_path):
    _with_root(monkeypatch, tmp_path)  # empty root: nothing local
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetNotAvailableError, match="arc_easy.*HF_HUB_OFFLINE=1.*LLM4ALL_DATA/arc"):
        load_named("arc_easy")
    with pytest.raises(DatasetNotAvailableError, match="mmlu"):
        load_named("mmlu")
    with pytest.raises(KeyError, match="registered"):
        load_named("hellaswag")
    monkeypatch.delenv("LLM4ALL_DATA")
    monkeypatch.setattr(data, "default_data_dir", lambda: None)
    with pytest.raises(DatasetNotAvailableError, match="set LLM4ALL_DATA"):
        data.data_root()

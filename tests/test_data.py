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


def test_mmlu_validation_names_file_record_and_line(monkeypatch, tmp_path):
    root = _with_root(monkeypatch, tmp_path)
    (root / "mmlu" / "dev").mkdir(parents=True)
    (root / "mmlu" / "dev" / "toy_dev.csv").write_text("Q1,a,b,c,d,A\nQ2,a,b,c,d,F\n")
    with pytest.raises(DataValidationError, match=r"toy_dev.csv: record 2 \(line 2\): answer 'F'"):
        load_named("mmlu", split="dev")
    (root / "mmlu" / "dev" / "toy_dev.csv").write_text("Q1,a,b,c,A\n")
    with pytest.raises(DataValidationError, match=r"toy_dev.csv: record 1 \(line 1\): expected 6 columns"):
        load_named("mmlu", split="dev")
    # quoted fields spanning lines (42 release files have them): record 3 covers physical lines 5-6, and its
    # answer 'E' stands on line 6 (hand-counted: record 1 = lines 1-3, record 2 = line 4)
    text = '"Q1\nspans\nthree lines",a,b,c,d,A\nQ2,a,b,c,d,B\n"Q3\nx",a,b,c,d,E\n'
    (root / "mmlu" / "dev" / "toy_dev.csv").write_text(text)
    with pytest.raises(DataValidationError, match=r"toy_dev.csv: record 3 \(lines 5-6\): answer 'E'"):
        load_named("mmlu", split="dev")
    assert text.split("\n")[5].endswith(",E")  # physical line 6 (1-based) holds the bad answer
    # a CSV-level error inside a multi-line record: the record and the lines read up to the error
    big = "x" * 70_000
    (root / "mmlu" / "dev" / "toy_dev.csv").write_text(f'Q1,a,b,c,d,A\n"{big}\n{big}\n{big}",a,b,c,d,A\n')
    with pytest.raises(DataValidationError, match=r"toy_dev.csv: record 2 \(lines 2-3\): bad CSV \(field larger"):
        load_named("mmlu", split="dev")
    (root / "mmlu" / "dev" / "toy_dev.csv").write_text(text.replace(",E", ",C"))
    rows = load_named("mmlu", split="dev")
    assert rows["id"] == ["toy/dev/1", "toy/dev/2", "toy/dev/3"] and rows[0]["question"].count("\n") == 2
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


def test_real_multiline_mmlu_records_keep_their_count(data_root):
    # a test file with multi-line quoted fields: records (not lines) are rows, the count is the manifest's
    import csv

    path = data_root / "mmlu" / "test" / "high_school_european_history_test.csv"
    lines = path.read_text(encoding="utf-8").count("\n")
    rows = load_named("mmlu", split="test", subjects="high_school_european_history")
    with path.open(encoding="utf-8", newline="") as f:
        assert len(rows) == sum(1 for _ in csv.reader(f)) == 165 < lines


def test_mmlu_auxiliary_train_is_registered(data_root):
    aux = load_named("mmlu_auxiliary_train")
    assert len(aux) == 617 + 601  # shared/data/MANIFEST.md: science_elementary + science_middle
    assert set(aux["subject"]) == {"science_elementary", "science_middle"}
    assert set(aux["answer"]) == {0, 1, 2, 3} and all(len(c) == 4 for c in aux["choices"])
    first = aux[0]
    assert first["choices"][first["answer"]] == "a prism" and first["id"] == "auxiliary_train/science_elementary/1"
    assert len(load_named("mmlu_auxiliary_train", files="science_middle")) == 601
    with pytest.raises(DatasetNotAvailableError, match="available: science_elementary, science_middle"):
        load_named("mmlu_auxiliary_train", files=["race"])
    with pytest.raises(ValueError, match="only the split 'train'"):
        load_named("mmlu_auxiliary_train", split="test")


def test_self_instruct_without_instances_names_file_and_line(monkeypatch, tmp_path):
    root = _with_root(monkeypatch, tmp_path)
    folder = root / "instruct" / "self_instruct"
    folder.mkdir(parents=True)
    good = {"id": "t0", "instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]}
    (folder / "seed_tasks.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "instances": []}) + "\n")
    with pytest.raises(DataValidationError, match=r"seed_tasks.jsonl:2: self-instruct task needs a non-empty"):
        load_named("self_instruct")
    (folder / "seed_tasks.jsonl").write_text(json.dumps({**good, "instances": [{"input": "x"}]}) + "\n")
    with pytest.raises(DataValidationError, match=r"seed_tasks.jsonl:1: instance 1 has no 'output'"):
        load_named("self_instruct")
    (folder / "seed_tasks.jsonl").write_text(json.dumps(good) + "\n")
    assert load_named("self_instruct")[0] == {"instruction": "Say hi.", "input": "", "output": "hi",
                                              "source": "self_instruct"}


def test_non_utf8_files_name_file_and_line(monkeypatch, tmp_path):
    root = _with_root(monkeypatch, tmp_path)
    corpus = root / "text" / "en" / "toy"
    corpus.mkdir(parents=True)
    (corpus / "ok.txt").write_text("fine\n", encoding="utf-8")
    (corpus / "bad.txt").write_bytes("line one\ncaf\u00e9 in latin-1\n".encode("latin-1"))
    with pytest.raises(DataValidationError, match=r"bad.txt:2: not valid UTF-8 \(byte 0xe9"):
        load_named("text:en/toy")
    (corpus / "bad.txt").unlink()
    assert load_named("text:en/toy")["text"] == ["fine\n"]
    (root / "mmlu" / "dev").mkdir(parents=True)
    (root / "mmlu" / "dev" / "toy_dev.csv").write_bytes(b"Q1,a,b,c,d,A\nQ\xff,a,b,c,d,A\n")
    with pytest.raises(DataValidationError, match=r"toy_dev.csv:2: not valid UTF-8"):
        load_named("mmlu", split="dev")
    folder = root / "arc" / "ARC-Easy"
    folder.mkdir(parents=True)
    (folder / "ARC-Easy-Test.jsonl").write_bytes(b'{"id": "\x81"}\n')
    with pytest.raises(DataValidationError, match=r"ARC-Easy-Test.jsonl:1: not valid UTF-8"):
        load_named("arc_easy", split="test")

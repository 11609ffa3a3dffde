"""exp_curriculum stage `decontam` on a toy data folder: an ARC question planted in one English document
and an MMLU question in one French document are found, a 12-word near miss is not, and the counts per
language x source reach decontam.parquet and the results table.

Oracle: the 13-gram sets written out here (lower-case, punctuation deleted, whitespace split; sets of word
tuples, no hashing), over the same three layouts of each item."""

from __future__ import annotations

import json
import string
import unicodedata

import pandas as pd
import pytest

from common.results import load_results

ARC_EASY = {"id": "Mercury_417466", "question": {
    "stem": "Which statement best explains why photosynthesis is the foundation of most food webs?",
    "choices": [{"text": "Sunlight is the source of energy for nearly all ecosystems.", "label": "A"},
                {"text": "Most ecosystems are found on land instead of in water.", "label": "B"},
                {"text": "Carbon dioxide is more available than other gases.", "label": "C"},
                {"text": "The producers in all ecosystems are plants.", "label": "D"}]}, "answerKey": "A"}
ARC_CHALLENGE = {"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a "
                 "meteorite impact. Which is the most likely effect of this increase in rotation?",
                 "options": [{"label": "A", "text": "Planetary density will decrease."},
                             {"label": "B", "text": "Planetary years will become longer."},
                             {"label": "C", "text": "Planetary days will become shorter."},
                             {"label": "D", "text": "Planetary gravity will become stronger."}], "answerKey": "C"}
MMLU_ROW = ["A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral",
            "paralysis of the facial muscles.", "paralysis of the facial muscles and loss of taste.",
            "paralysis of the facial muscles, loss of taste and lacrimation.",
            "paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.", "A"]
FILLER = ("The committee met on Tuesday to discuss the budget for the new library and the repairs of the roof. "
          "Several members asked for more time before the vote, and the chair agreed to a second meeting. ")
EN = [FILLER * 2,
      # the ARC-Challenge question (train split) quoted in a web page, without its options
      FILLER + "Quiz time! An astronomer observes that a planet rotates faster after a meteorite impact. Which is "
      "the most likely effect of this increase in rotation? Think about it before reading on. " + FILLER,
      # near miss: 12 consecutive words of an ARC-Easy question, then other words
      FILLER + "Which statement best explains why photosynthesis is the foundation of most food chains, people "
      "wondered at the meeting. " + FILLER,
      "A small dog ran across the park, chasing a red ball that bounced over the grass and into the pond. " * 3]
FR = ["Le soleil se levait sur la ville endormie; les rues étaient encore vides et silencieuses. " * 3,
      "Dans le cours d'anatomie, le professeur a écrit au tableau : A lesion causing compression of the facial "
      "nerve at the stylomastoid foramen will cause ipsilateral paralysis. Les étudiants ont pris des notes. "
      "Le soleil se levait sur la ville endormie; les rues étaient encore vides. "]


@pytest.fixture()
def data_dir(tmp_path):
    (tmp_path / "text/en/c4").mkdir(parents=True)
    (tmp_path / "text/en/c4/c4_demo.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in EN))
    (tmp_path / "text/fr/piaf").mkdir(parents=True)
    squad = {"data": [{"title": "t", "paragraphs": [{"context": c, "qas": []} for c in FR]}]}
    (tmp_path / "text/fr/piaf/piaf-v1.1.json").write_text(json.dumps(squad), encoding="utf-8")
    (tmp_path / "arc/ARC-Easy").mkdir(parents=True)
    (tmp_path / "arc/ARC-Easy/ARC-Easy-Test.jsonl").write_text(json.dumps(ARC_EASY) + "\n")
    (tmp_path / "arc/ARC-Challenge").mkdir(parents=True)
    (tmp_path / "arc/ARC-Challenge/ARC-Challenge-Train.jsonl").write_text(json.dumps(ARC_CHALLENGE) + "\n")
    (tmp_path / "mmlu/test").mkdir(parents=True)
    (tmp_path / "mmlu/test/anatomy_test.csv").write_text(",".join(f'"{c}"' for c in MMLU_ROW) + "\n")
    return tmp_path


def grams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    kept = "".join(c for c in text.lower()
                   if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    ws = kept.split()
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def layouts(question: str, choices: list[str]) -> list[str]:
    lettered = question.strip() + "".join(f"\n{'ABCD'[i]}. {c}" for i, c in enumerate(choices))
    return ["\n".join([question, *choices]), lettered, question]


def oracle_items() -> dict[str, list[str]]:
    return {"arc": layouts(ARC_EASY["question"]["stem"], [c["text"] for c in ARC_EASY["question"]["choices"]])
            + layouts(ARC_CHALLENGE["question"], [o["text"] for o in ARC_CHALLENGE["options"]]),
            "mmlu": layouts(MMLU_ROW[0], MMLU_ROW[1:5])}


def test_decontam_stage_finds_planted_questions(data_dir, tmp_path):
    from exp_curriculum import run

    out, res = tmp_path / "out", tmp_path / "res"
    argv = ["--profile", "quick", "--data-dir", str(data_dir), "--results-dir", str(res), "--outputs-dir", str(out),
            "num_proc=1", "threads=1", "corpus.min_chars=100", "stages=[metrics,decontam]"]
    assert run.main(argv) == 0
    folder = next((out / "exp_curriculum/decontam").glob("*/decontam.parquet")).parent
    meta = pd.read_parquet(next((out / "exp_curriculum/metrics").glob("*/metrics.parquet")))
    docs = pd.read_parquet(folder / "decontam_docs.parquet")
    assert docs["id"].tolist() == meta["id"].tolist()

    # oracle flags: a document shares a 13-gram with any layout of any item of the set
    items = oracle_items()
    for name in ("arc", "mmlu"):
        eval_grams = set().union(*(grams(t) for t in items[name]))
        expected = [bool(grams(t) & eval_grams) for t in meta["text"]]
        assert docs[f"decontam_{name}"].tolist() == expected
    assert docs["decontam_arc"].sum() == 1 and docs["decontam_mmlu"].sum() == 1   # the plants, not the near miss
    planted_en = meta["text"].str.contains("astronomer").to_numpy()
    assert docs["decontam_arc"].to_numpy()[planted_en].all()
    assert docs.loc[planted_en, "decontam_items"].tolist() == ["ARC-Challenge/train/Mercury_7175875"]

    summary = pd.read_parquet(folder / "decontam.parquet")
    row = summary.set_index(["language", "source", "eval_set"])
    assert row.loc[("en", "c4/c4_demo", "arc"), ["n_docs", "n_contaminated", "n_eval_hit"]].tolist() == [4, 1, 1]
    assert row.loc[("en", "c4/c4_demo", "arc"), "frac_contaminated"] == 1 / 4
    assert row.loc[("en", "c4/c4_demo", "mmlu"), "n_contaminated"] == 0
    assert row.loc[("fr", "piaf/piaf-v1.1", "mmlu"), "frac_contaminated"] == 1 / 2
    assert row.loc[("all", "all", "any"), ["n_docs", "n_contaminated"]].tolist() == [6, 2]
    assert row.loc[("all", "all", "arc"), "n_eval"] == 2 and row.loc[("all", "all", "mmlu"), "n_eval"] == 1

    info = json.loads((folder / "decontam.json").read_text())
    assert info["eval_items"] == {"arc": 2, "mmlu": 1}
    assert "ARC-Challenge/test" in info["missing"] and "ARC-Easy/train" in info["missing"]

    rows = load_results(res).query("table == 'curriculum_decontam'")
    frac = rows.query("metric == 'frac_contaminated' and method == 'arc' and `p.language` == 'en'")
    assert frac["value"].tolist() == [0.25] and frac["n"].tolist() == [4]
    assert len(rows) == 2 * len(summary)

"""exp_distill_data.data on the real offline files: exact prompts of known rows, lm-eval's own templates
(read from the installed lm_eval package and rendered with jinja2) as the oracle of the "eval" layout,
answers checked against the raw files' answer keys, seeded determinism, planted test items caught by
decontamination, a brute-force 13-gram oracle on ARC-Easy, and MMLU dev never in both pool and validation."""

from __future__ import annotations

import csv
import importlib.util
import json
import string
import unicodedata
from pathlib import Path

import jinja2
import pytest
import yaml

from common import decontam
from exp_distill_data import data as dd

ALL_SOURCES = list(dd.SOURCES)


# ----------------------------------------------------------------------------------- raw oracles
def _raw_arc(root: Path, split: str) -> list[dict]:
    path = root / "arc" / "ARC-Easy" / f"ARC-Easy-{split}.jsonl"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def _raw_mmlu(root: Path, split: str) -> list[dict]:
    rows = []
    for path in sorted((root / "mmlu" / split).glob("*.csv")):
        with path.open(newline="", encoding="utf-8") as f:
            for rec in csv.reader(f):
                rows.append({"subject": path.stem.rsplit("_", 1)[0], "question": rec[0], "choices": rec[1:5],
                             "answer": "ABCD".index(rec[5].strip())})
    return rows


def _words(text: str) -> list[str]:
    """The normalisation the decontam module documents, written out independently."""
    kept = (c for c in text.lower() if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    return "".join(kept).split()


@pytest.fixture(scope="module")
def full_pool():
    return dd.build_pool(ALL_SOURCES, mmlu_aux_limit=None, seed=0)


@pytest.fixture(scope="module")
def test_items():
    return dd.eval_texts()


@pytest.fixture(scope="module")
def decontaminated(full_pool, test_items):
    index = dd.eval_index(test_items)
    kept, report = dd.decontaminate(full_pool, index)
    return index, kept, report


# ------------------------------------------------------------------------------------ formatting
def test_exact_prompts_of_known_rows(full_pool):
    by_id = {ex["id"]: ex for ex in full_pool}
    arc = by_id["arc_easy/train/NYSEDREGENTS_2006_8_10"]   # numeric labels 1-4 in the file -> letters
    assert arc["prompt"] == ("Question: Rocks are classified as igneous, metamorphic, or sedimentary according to\n"
                             "A. their color\nB. their shape\nC. how they formed\nD. the minerals they contain\n"
                             "Answer:")
    assert arc["answer"] == " how they formed"   # auto: lm-eval's arc_easy scores the choice text
    assert (arc["source"], arc["subject"], arc["label"]) == ("arc_easy", "arc_easy", 2)
    mmlu = by_id["mmlu/abstract_algebra/dev/1"]
    assert mmlu["prompt"] == ("Question: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
                              "A. 0\nB. 1\nC. 2\nD. 3\nAnswer:")
    assert mmlu["answer"] == " B"                # auto: lm-eval's mmlu scores the letter
    assert (mmlu["source"], mmlu["subject"]) == ("mmlu_dev", "abstract_algebra")
    aux = by_id["mmlu/auxiliary_train/science_elementary/1"]
    assert aux["prompt"].startswith("Question: Sir Isaac Newton determined that white light")
    assert aux["prompt"].endswith("\nA. a prism\nB. a telescope\nC. a microscope\nD. a magnifying glass\nAnswer:")
    assert aux["answer"] == " A" and aux["subject"] == "science_elementary"
    assert set(mmlu) >= {"id", "source", "subject", "prompt", "answer"}

    row = {"id": "x", "question": "Q?", "choices": ["p", "q", "r"], "answer": 1, "subject": "s"}
    assert dd.mc_example(row, "mmlu_dev", "letter_text")["answer"] == " B. q"
    assert dd.mc_example(row, "arc_easy", "letter")["answer"] == " B"
    assert dd.mc_example(row, "mmlu_dev", "text")["answer"] == " q"
    assert dd.mc_example(row, "arc_easy", prompt_format="eval")["prompt"] == "Question: Q?\nAnswer:"
    with pytest.raises(ValueError, match="choice text"):
        dd.mc_example(row, "arc_easy", "letter", prompt_format="eval")
    with pytest.raises(ValueError, match="answer_format"):
        dd.build_pool(["arc_easy"], None, 0, answer_format="LETTER")


def test_instruction_pool_mapping(full_pool, data_root):
    by_id = {ex["id"]: ex for ex in full_pool}
    lines = (data_root / "instruct" / "self_instruct" / "seed_tasks.jsonl").read_text("utf-8").splitlines()
    for position, line in enumerate(lines[:20], 1):
        task = json.loads(line)
        inp, out = task["instances"][0]["input"].strip(), task["instances"][0]["output"]
        ex = by_id[f"self_instruct/{position}"]
        assert ex["prompt"] == (f"{task['instruction']}\n\n{inp}" if inp else task["instruction"])
        assert ex["answer"] == out and ex["source"] == ex["subject"] == "self_instruct"
    assert any(ex["source"] == "alpaca" and "\n\n" in ex["prompt"] for ex in full_pool)


def _lm_eval_template(rel: str) -> dict:
    base = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"
    return yaml.safe_load((base / rel).read_text("utf-8"))


def _render(template: str, doc: dict) -> str:
    # lm-eval's own jinja environment settings (lm_eval/utils.py)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(template).render(**doc)


def test_eval_layout_equals_lm_eval_templates(data_root):
    """prompt_format="eval" + auto answers is the text lm-eval scores: its doc_to_text, then " " + the
    correct choice, on rows read straight from the raw files (HF layout for ARC, as lm-eval sees it)."""
    arc_cfg = _lm_eval_template("arc/arc_easy.yaml")
    val = {ex["id"]: ex for ex in dd.split_validation([], per_subtask=10**6, prompt_format="eval")[1]["arc_easy"]}
    for raw in _raw_arc(data_root, "Dev"):
        q = raw["question"]
        doc = {"question": q["stem"], "answerKey": raw["answerKey"],
               "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}}
        target = int(_render(arc_cfg["doc_to_target"], doc))
        ex = val[f"arc_easy/validation/{raw['id']}"]
        assert ex["prompt"] == _render(arc_cfg["doc_to_text"], doc)
        assert ex["answer"] == " " + doc["choices"]["text"][target]
    mmlu_cfg = _lm_eval_template("mmlu/default/_default_template_yaml")
    mine = dd.split_validation([], per_subtask=5, prompt_format="eval")[1]
    mine = [ex for subject, exs in mine.items() if subject != "arc_easy" for ex in exs]
    raw_rows = _raw_mmlu(data_root, "dev")
    assert len(mine) == len(raw_rows) == 285
    rendered = {(_render(mmlu_cfg["doc_to_text"], r), " " + mmlu_cfg["doc_to_choice"][r["answer"]]) for r in raw_rows}
    assert {(ex["prompt"], ex["answer"]) for ex in mine} == rendered
    lettered = dd.split_validation([], per_subtask=5)[1]["anatomy"]
    assert all(ex["prompt"] == "Question: " + dd.mc_prompt(ex["question"], ex["choices"], "mmlu", "eval")
               for ex in lettered)


def test_every_example_well_formed(full_pool, data_root):
    assert len({ex["id"] for ex in full_pool}) == len(full_pool)
    counts = {s: sum(ex["source"] == s for ex in full_pool) for s in ALL_SOURCES}
    assert counts["arc_easy"] == 2251 and counts["mmlu_dev"] == 285 and counts["mmlu_auxiliary_train"] == 1218
    assert all(counts.values())
    for ex in full_pool:
        assert ex["prompt"].strip() and ex["answer"].strip(), ex["id"]
        if "choices" not in ex:
            continue
        letters = list(dd.LETTERS[:len(ex["choices"])])
        assert ex["prompt"].endswith("\nAnswer:")
        if ex["source"] == "arc_easy":
            assert ex["answer"][1:] in ex["choices"]
        else:
            assert ex["answer"][1:] in letters
    # against the raw files' answer keys (not common.data's parsing)
    by_id = {ex["id"]: ex for ex in full_pool}
    for raw in _raw_arc(data_root, "Train"):
        key = next(c["text"] for c in raw["question"]["choices"] if c["label"] == raw["answerKey"])
        assert by_id[f"arc_easy/train/{raw['id']}"]["answer"] == " " + key
    letters_by_question = {(r["subject"], r["question"]): "ABCD"[r["answer"]] for r in _raw_mmlu(data_root, "dev")}
    dev = [ex for ex in full_pool if ex["source"] == "mmlu_dev"]
    assert sorted(" " + letters_by_question[(ex["subject"], ex["question"])] for ex in dev) == \
        sorted(ex["answer"] for ex in dev)


def test_deterministic_given_the_seed():
    a = dd.build_pool(dd.DEFAULT_SOURCES, mmlu_aux_limit=100, seed=3)
    b = dd.build_pool(dd.DEFAULT_SOURCES, mmlu_aux_limit=100, seed=3)
    c = dd.build_pool(dd.DEFAULT_SOURCES, mmlu_aux_limit=100, seed=4)
    assert a == b
    assert [ex["id"] for ex in a] != [ex["id"] for ex in c]
    aux = lambda pool: sorted(ex["id"] for ex in pool if ex["source"] == "mmlu_auxiliary_train")  # noqa: E731
    assert len(aux(a)) == 100 and aux(a) != aux(c)
    # the aux subsample does not depend on the other sources
    assert aux(dd.build_pool(["mmlu_auxiliary_train"], 100, 3)) == aux(a)
    full_aux = set(aux(dd.build_pool(["mmlu_auxiliary_train"], None, 3)))
    assert len(full_aux) == 1218 and set(aux(a)) <= full_aux
    assert sorted(ex["id"] for ex in a if ex["source"] == "arc_easy") == \
        sorted(ex["id"] for ex in c if ex["source"] == "arc_easy")


# -------------------------------------------------------------------------------- decontamination
def test_planted_test_items_are_found_and_clean_rows_kept(full_pool, test_items):
    arc_test = {f"arc_easy/test/{r['id']}": r for r in dd.cdata.load_arc("ARC-Easy", "test")}
    long_id = "arc_easy/test/Mercury_417466"
    long_item = arc_test[long_id]   # question of 14 words
    # a short test item: question (8-11 words) and every choice < 12 words, the plain layout >= 13 words
    short_id, short_item = next((i, r) for i, r in arc_test.items()
                                if 8 <= len(_words(r["question"])) < 12
                                and max(len(_words(c)) for c in r["choices"]) < 12
                                and len(_words(dd.mc_text(r["question"], r["choices"]))) >= 13)
    picked = {i: test_items["arc_easy_test"][i] for i in (long_id, short_id)}
    copy = dd.mc_example(long_item, "arc_easy", split="planted")
    variant = {"id": "planted/variant", "source": "alpaca", "subject": "alpaca",
               "prompt": "which STATEMENT -- best explains, why PHOTOSYNTHESIS is the foundation of most food webs?!",
               "answer": "Sunlight is the source of energy for nearly all ecosystems"}
    quoted = {"id": "planted/quoted", "source": "lima", "subject": "lima",
              "answer": "It is " + short_item["choices"][0],
              "prompt": "Answer this quiz.\n" + dd.mc_prompt(short_item["question"].upper(), short_item["choices"])}
    reordered = dd.mc_example(dict(short_item, id="reordered", choices=short_item["choices"][::-1]), "arc_easy",
                              split="planted")
    clean = [ex for ex in full_pool if ex["source"] in ("arc_easy", "alpaca")][:300]
    pool = [*clean[:150], copy, variant, quoted, reordered, *clean[150:]]
    kept, report = dd.decontaminate(pool, {"arc_easy_test": picked})
    planted = {copy["id"], "planted/variant", "planted/quoted", reordered["id"]}
    assert [ex["id"] for ex in kept] == [ex["id"] for ex in clean]   # only the planted ones dropped, order kept
    assert report["n_contaminated"] == 4 and report["n"] == 304 and report["n_kept"] == 300
    src = report["sources"]
    assert src["arc_easy"]["example_ids"] == [copy["id"], reordered["id"]]
    assert src["arc_easy"]["matches"] == {copy["id"]: [long_id], reordered["id"]: [short_id]}
    assert src["alpaca"]["n_contaminated"] == 1 and src["lima"]["matches"]["planted/quoted"] == [short_id]
    assert src["alpaca"]["fraction"] == pytest.approx(1 / src["alpaca"]["n"])
    assert set(src) == {"arc_easy", "alpaca", "lima"} and report["eval_sets"] == {"arc_easy_test": 2}
    assert {i for r in src.values() for i in r["example_ids"]} == planted
    # the lettered quote and the reordered copy of a short item share no 13-gram with its plain layout:
    # they are caught only through the lettered and question layouts
    plain = {"arc_easy_test": {i: dd.item_layouts(r["question"], r["choices"], ("plain",))
                               for i, r in ((long_id, long_item), (short_id, short_item))}}
    _, report_plain = dd.decontaminate(pool, plain, questions=False)
    assert {i for r in report_plain["sources"].values() for i in r["example_ids"]} == {copy["id"], "planted/variant"}
    json.dumps(report)   # JSON-ready for ctx.save_json


def test_real_pools_decontaminated(decontaminated):
    index, kept, report = decontaminated
    assert report["eval_sets"] == {"arc_easy_test": 2376, "mmlu_test": 14042}
    src = report["sources"]
    assert sum(r["n"] for r in src.values()) == report["n"]
    assert sum(r["n_contaminated"] for r in src.values()) == report["n_contaminated"] == report["n"] - len(kept)
    assert src["arc_easy"]["n_contaminated"] > 0 and src["arc_easy"]["by_eval_set"]["arc_easy_test"] > 0
    # nothing left overlaps a test item, by the module's own check ...
    flags, _ = decontam.contaminated([dd.example_text(ex) for ex in kept], index)
    assert not any(flags)
    # ... and by an independent oracle: no kept multiple-choice example asks a test question (equal after
    # normalisation, whatever its options; the brute-force test shows such examples exist before)
    tests = [*dd.cdata.load_arc("ARC-Easy", "test"), *dd.cdata.load_mmlu("test")]
    test_questions = {" ".join(_words(r["question"])) for r in tests}
    assert not [ex["id"] for ex in kept if "question" in ex and " ".join(_words(ex["question"])) in test_questions]


def _oracle_hits(train_texts: list[str], eval_texts: list[str], n: int = 13, min_short: int = 8) -> list[bool]:
    """common.decontam's documented rule, by brute force over word strings: n-grams of long eval texts;
    a short eval text (min_short..n-1 words) as a contiguous span; a very short one as a whole text."""
    grams, spans, wholes = set(), {}, set()
    for t in eval_texts:
        w = _words(t)
        if len(w) >= n:
            grams |= {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}
        elif len(w) >= min_short:
            spans.setdefault(len(w), set()).add(" ".join(w))
        elif w:
            wholes.add(" ".join(w))
    out = []
    for t in train_texts:
        w = _words(t)
        hit = len(w) < n and " ".join(w) in wholes | spans.get(len(w), set())
        hit = hit or any(" ".join(w[i:i + n]) in grams for i in range(len(w) - n + 1))
        hit = hit or any(" ".join(w[i:i + m]) in s for m, s in spans.items() for i in range(len(w) - m + 1))
        out.append(hit)
    return out


def test_arc_train_vs_test_equals_brute_force_oracle(full_pool, test_items):
    arc_pool = [ex for ex in full_pool if ex["source"] == "arc_easy"]
    items = test_items["arc_easy_test"]
    flat = [t for texts in items.values() for t in texts]
    by_text = _oracle_hits([dd.example_text(ex) for ex in arc_pool], flat)
    by_question = _oracle_hits([ex["question"] for ex in arc_pool], flat)
    expected = {ex["id"] for ex, a, b in zip(arc_pool, by_text, by_question) if a or b}
    kept, report = dd.decontaminate(arc_pool, {"arc_easy_test": items})
    assert {ex["id"] for ex in arc_pool} - {ex["id"] for ex in kept} == expected
    assert report["sources"]["arc_easy"]["n_contaminated"] == len(expected) > 0
    # the plain GPT-3 convention (plain layout, 13-grams and its short-text rule) drops a subset
    plain = [texts[0] for texts in items.values()]
    expected_plain = {ex["id"] for ex, a in zip(arc_pool, _oracle_hits([dd.example_text(ex) for ex in arc_pool],
                                                                        plain)) if a}
    kept_plain, _ = dd.decontaminate(arc_pool, {"arc_easy_test": plain}, questions=False)
    assert {ex["id"] for ex in arc_pool} - {ex["id"] for ex in kept_plain} == expected_plain
    assert expected_plain < expected
    # some train questions equal a test question: the question-equality oracle finds them before
    test_q = {" ".join(_words(r["question"])) for r in dd.cdata.load_arc("ARC-Easy", "test")}
    same_q = {ex["id"] for ex in arc_pool if " ".join(_words(ex["question"])) in test_q}
    assert same_q and same_q <= expected and not same_q <= expected_plain


# ------------------------------------------------------------------------------ LESS validation
def test_split_validation_default_layout(data_root):
    pool = dd.build_pool(dd.DEFAULT_SOURCES, None, 0)
    kept, val = dd.split_validation(pool, per_subtask=5, seed=0)
    assert kept == pool                     # no MMLU dev in the default pool: nothing to remove
    subjects = {r["subject"] for r in _raw_mmlu(data_root, "dev")}
    assert set(val) == {"arc_easy"} | subjects and len(subjects) == 57
    assert all(len(v) == 5 for v in val.values())
    dev_ids = {f"arc_easy/validation/{r['id']}" for r in _raw_arc(data_root, "Dev")}
    assert {ex["id"] for ex in val["arc_easy"]} <= dev_ids
    assert all(ex["subject"] == s for s, exs in val.items() for ex in exs)
    assert not {ex["id"] for exs in val.values() for ex in exs} & {ex["id"] for ex in kept}
    again = dd.split_validation(pool, per_subtask=5, seed=0)[1]
    other = dd.split_validation(pool, per_subtask=5, seed=1)[1]
    assert again == val and other["arc_easy"] != val["arc_easy"]


def test_mmlu_dev_never_in_both(full_pool):
    kept, val = dd.split_validation(full_pool, per_subtask=2, seed=0)
    val_ids = {ex["id"] for exs in val.values() for ex in exs}
    assert len(val_ids) == 58 * 2 and not val_ids & {ex["id"] for ex in kept}
    assert not any(ex["source"] == "mmlu_dev" for ex in kept)   # drawn or not, the dev split leaves the pool
    assert len(kept) == len(full_pool) - 285
    # MMLU val as the target set instead: MMLU dev may stay in the pool, the two stay disjoint
    kept_v, val_v = dd.split_validation(full_pool, per_subtask=3, seed=0, mmlu_split="val",
                                        subjects=["anatomy", "virology"])
    assert set(val_v) == {"arc_easy", "anatomy", "virology"} and all(len(v) == 3 for v in val_v.values())
    assert len(kept_v) == len(full_pool)
    assert all(ex["id"].startswith("mmlu/anatomy/val/") for ex in val_v["anatomy"])
    assert not {ex["id"] for exs in val_v.values() for ex in exs} & {ex["id"] for ex in kept_v}


# ------------------------------------------------------------------------------------- budgets
def test_budget_sizes():
    assert dd.budget_sizes(2251) == [22, 112, 225]           # floor, as LESS's int(percentage * n)
    assert dd.budget_sizes(100, (0.29, 0.05), counts=(5, 50)) == [5, 29, 50]
    assert dd.budget_sizes(10, (0.01,)) == [1]
    assert dd.budget_sizes(3469, fractions=()) == []
    for bad in [dict(fractions=(0.0,)), dict(fractions=(1.5,)), dict(counts=(0,)), dict(counts=(101,))]:
        with pytest.raises(ValueError):
            dd.budget_sizes(100, **bad)

"""Instruction data of exp_distill_data: the training pool, the held-out test texts, 13-gram
decontamination, LESS's validation (target-task) sets and the selection budgets. Pure functions over
``common.data``; the stage that calls them lives in ``run.py``.

    pool = build_pool(["arc_easy", "mmlu_auxiliary_train"], mmlu_aux_limit=None, seed=0)
    pool, report = decontaminate(pool, eval_texts())          # drops examples sharing a 13-gram with a test set
    pool, val = split_validation(pool, per_subtask=5, seed=0)  # val: {"arc_easy": [...], "<mmlu subject>": [...]}
    sizes = budget_sizes(len(pool))                            # 1 %, 5 %, 10 % of the pool

An example is a dict with the keys ``common.sft`` reads, ``prompt`` and ``answer`` (the loss is on the
answer only), plus ``id``, ``source`` and ``subject`` (the MMLU subject / auxiliary file, ``"arc_easy"``,
or the instruction pool's name). Multiple-choice examples also keep ``question``, ``choices`` and
``label`` (index of the correct choice): decontamination reads them, and tests check the answer.

**Prompt** (``prompt_format``):

- ``"lettered"`` (default): ``"Question: <question>\\nA. <choice>\\nB. <choice>...\\nAnswer:"``, options
  lettered A, B, C, ... in file order (ARC's numeric labels 1-4 become letters too);
- ``"eval"``: exactly lm-eval's prompt of the benchmark the source targets: ARC-Easy
  ``"Question: <question>\\nAnswer:"`` (no options), MMLU ``"<question.strip()>\\nA. ...\\nD. ...\\nAnswer:"``.

**Answer** (``answer_format``), with lm-eval's target delimiter (one leading space), so that a plain
template of ``"{instruction}"`` (``SFTConfig.plain_template``) trains on the very text lm-eval scores:

- ``"auto"`` (default): each source in the protocol of its benchmark. lm-eval's ``arc_easy`` scores the
  log-likelihood of the choice *text* after ``"Answer:"`` -> ARC-Easy answers ``" <choice text>"``;
  lm-eval's ``mmlu`` scores the *letter* -> MMLU dev and auxiliary_train answer ``" B"``;
- ``"letter"`` (``" B"``), ``"text"`` (``" <choice text>"``), ``"letter_text"`` (``" B. <choice text>"``)
  for every multiple-choice source.

Instruction pools (``alpaca``, ``alpaca_gpt4``, ``lima``, ``self_instruct``, as registered in
``common.data``): ``prompt`` = instruction, plus ``"\\n\\n" + input`` when there is one (as
``common.sft``'s chat template joins them), ``answer`` = output.

**MMLU dev**: either in the pool (source ``mmlu_dev``) or LESS's validation set, never both:
``split_validation`` (default ``mmlu_split="dev"``) removes from the pool every example of the splits
it draws the validation set from. Default layout, as LESS: pool = ARC-Easy train + MMLU auxiliary_train, validation =
ARC-Easy validation ("Dev" file) + MMLU dev (5 per subject).

**Decontamination** (``common.decontam``: lower-case, punctuation deleted, 13-grams of words; texts under
13 words by its short-text rule). A multiple-choice item is compared as its question and its choices,
one per line, without letters (``mc_text``, the same on both sides); an instruction example as its
prompt and answer. On top of that GPT-3 convention, by default, each test item is also indexed in the
lettered layout and as its question alone, and each multiple-choice training question is also checked
alone (``eval_texts``, ``decontaminate``): that catches copies with reordered or replaced options and
short questions asked again, which share no 13-gram with the item.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from common import data as cdata
from common import decontam

log = logging.getLogger(__name__)

MC_SOURCES = ("arc_easy", "mmlu_dev", "mmlu_auxiliary_train")
INSTRUCT_SOURCES = tuple(cdata.INSTRUCT_FILES)
SOURCES = MC_SOURCES + INSTRUCT_SOURCES
DEFAULT_SOURCES = ("arc_easy", "mmlu_auxiliary_train")
ANSWER_FORMATS = ("auto", "letter", "text", "letter_text")
PROMPT_FORMATS = ("lettered", "eval")
# the benchmark whose protocol each multiple-choice source follows under answer_format="auto"
BENCHMARK = {"arc_easy": "arc_easy", "mmlu_dev": "mmlu", "mmlu_auxiliary_train": "mmlu"}
PROTOCOL = {"arc_easy": "text", "mmlu": "letter"}   # what lm-eval scores after "Answer:"
LETTERS = cdata.LETTERS
DELIMITER = " "   # lm-eval's target_delimiter between "Answer:" and the scored continuation


# ------------------------------------------------------------------------------------- formatting
def _check_formats(answer_format: str, prompt_format: str) -> None:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")


def mc_prompt(question: str, choices: Sequence[str], benchmark: str = "mmlu", prompt_format: str = "lettered") -> str:
    """The prompt of a multiple-choice item (module docstring); ends with ``"Answer:"``."""
    if prompt_format == "eval" and benchmark == "arc_easy":
        return f"Question: {question}\nAnswer:"
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    head = question.strip() if prompt_format == "eval" else f"Question: {question.strip()}"
    return f"{head}{options}\nAnswer:"


def mc_answer(choices: Sequence[str], label: int, answer_format: str) -> str:
    """The answer text (with lm-eval's leading space) in a concrete format (not ``"auto"``)."""
    if answer_format == "letter":
        return f"{DELIMITER}{LETTERS[label]}"
    if answer_format == "text":
        return f"{DELIMITER}{choices[label]}"
    if answer_format == "letter_text":
        return f"{DELIMITER}{LETTERS[label]}. {choices[label]}"
    raise ValueError(f"answer_format must be letter|text|letter_text here, got {answer_format!r}")


def resolve_answer_format(source: str, answer_format: str, prompt_format: str = "lettered") -> str:
    """The concrete answer format of a multiple-choice source (``"auto"``: its benchmark's protocol)."""
    _check_formats(answer_format, prompt_format)
    benchmark = BENCHMARK[source]
    fmt = PROTOCOL[benchmark] if answer_format == "auto" else answer_format
    if prompt_format == "eval" and benchmark == "arc_easy" and fmt != "text":
        raise ValueError(f"prompt_format='eval' shows ARC-Easy without lettered options, so its answer must be "
                         f"the choice text (answer_format auto|text), got {answer_format!r}")
    return fmt


def mc_example(row: Mapping[str, Any], source: str, answer_format: str = "auto", prompt_format: str = "lettered",
               split: str = "train") -> dict:
    """One training/validation example from a ``common.data`` multiple-choice row (``split`` names ARC
    rows' split in their id; MMLU rows' ids already hold it)."""
    fmt = resolve_answer_format(source, answer_format, prompt_format)
    question, choices, label = str(row["question"]), [str(c) for c in row["choices"]], int(row["answer"])
    if source == "arc_easy":
        ex_id, subject = f"arc_easy/{split}/{row['id']}", "arc_easy"
    else:
        ex_id, subject = f"mmlu/{row['id']}", str(row["subject"])
    return {"id": ex_id, "source": source, "subject": subject,
            "prompt": mc_prompt(question, choices, BENCHMARK[source], prompt_format),
            "answer": mc_answer(choices, label, fmt), "question": question, "choices": choices, "label": label}


def instruct_example(row: Mapping[str, Any], source: str, position: int) -> dict:
    """An instruction-pool row (instruction, input, output) as prompt/answer."""
    inp = str(row.get("input") or "").strip()
    prompt = f"{row['instruction']}\n\n{inp}" if inp else str(row["instruction"])
    return {"id": f"{source}/{position}", "source": source, "subject": source, "prompt": prompt,
            "answer": str(row["output"])}


def mc_text(question: str, choices: Sequence[str]) -> str:
    """The text decontamination compares for a multiple-choice item (training and test alike)."""
    return "\n".join([question, *choices])


def example_text(example: Mapping[str, Any]) -> str:
    """What of a training example is checked for overlap with the test sets."""
    if "choices" in example:
        return mc_text(example["question"], example["choices"])
    return f"{example['prompt']}\n{example['answer']}"


# ------------------------------------------------------------------------------------------ pool
def _source_rows(source: str, mmlu_aux_limit: int | None, seed: int) -> list[dict]:
    if source == "arc_easy":
        return list(cdata.load_arc("ARC-Easy", "train"))
    if source == "mmlu_dev":
        return list(cdata.load_mmlu("dev"))
    if source == "mmlu_auxiliary_train":
        rows = list(cdata.load_named("mmlu_auxiliary_train"))
        if mmlu_aux_limit is not None and mmlu_aux_limit < len(rows):
            # its own seeded stream: the subsample does not depend on which other sources are on
            keep = sorted(random.Random(f"mmlu_aux:{seed}").sample(range(len(rows)), mmlu_aux_limit))
            rows = [rows[i] for i in keep]
        return rows
    return list(cdata.load_named(source))


def build_pool(sources: Sequence[str] = DEFAULT_SOURCES, mmlu_aux_limit: int | None = None, seed: int = 0,
               answer_format: str = "auto", prompt_format: str = "lettered") -> list[dict]:
    """Training examples of ``sources`` (``SOURCES``), shuffled by ``seed`` (same seed, same order).

    ``mmlu_aux_limit``: a seeded random subsample of that many MMLU auxiliary_train rows (``None``: all).
    """
    _check_formats(answer_format, prompt_format)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"unknown or no source(s) {unknown}; known: {', '.join(SOURCES)}")
    if mmlu_aux_limit is not None and mmlu_aux_limit < 1:
        raise ValueError(f"mmlu_aux_limit must be >= 1 or None, got {mmlu_aux_limit}")
    pool: list[dict] = []
    for source in dict.fromkeys(sources):   # a repeated source is loaded once
        rows = _source_rows(source, mmlu_aux_limit, seed)
        if source in MC_SOURCES:
            pool += [mc_example(r, source, answer_format, prompt_format) for r in rows]
        else:
            pool += [instruct_example(r, source, i + 1) for i, r in enumerate(rows)]
    _check_unique_ids(pool)
    random.Random(f"pool_order:{seed}").shuffle(pool)
    return pool


def _check_unique_ids(examples: Iterable[Mapping[str, Any]]) -> None:
    seen: set[str] = set()
    for ex in examples:
        if ex["id"] in seen:
            raise ValueError(f"duplicate example id {ex['id']!r}")
        seen.add(ex["id"])


# --------------------------------------------------------------------------------- test sets
EVAL_LAYOUTS = ("plain", "lettered", "question")
EvalTexts = Mapping[str, Mapping[str, str | Sequence[str]] | Sequence[str]]


def item_layouts(question: str, choices: Sequence[str], layouts: Sequence[str] = EVAL_LAYOUTS) -> tuple[str, ...]:
    """The texts a test item is indexed as (module docstring, "Decontamination")."""
    texts = {"plain": mc_text(question, choices), "lettered": mc_prompt(question, choices), "question": question}
    unknown = [x for x in layouts if x not in texts]
    if unknown or not layouts:
        raise ValueError(f"unknown or no layout(s) {unknown}; known: {', '.join(EVAL_LAYOUTS)}")
    return tuple(texts[x] for x in layouts)


def eval_texts(layouts: Sequence[str] = EVAL_LAYOUTS) -> dict[str, dict[str, tuple[str, ...]]]:
    """The held-out test items, never trained on, ``{"arc_easy_test": {id: texts}, "mmlu_test": {id: texts}}``
    (ARC-Easy test 2,376, MMLU test 14,042); ``texts`` holds the item in each of ``layouts``:

    - ``"plain"``: question and choices (``mc_text``), the usual 13-gram check;
    - ``"lettered"``: ``mc_prompt``'s layout, so that a text quoting the item as "question A. option
      B. option" is caught even when no 13 words of the plain layout are consecutive there;
    - ``"question"``: the question alone, so that a copy with the options reordered or replaced is caught
      when the question has 13 words or more, or, as ``common.decontam``'s short-text rule, when it
      has 8-12 words and appears verbatim.
    """
    arc = cdata.load_arc("ARC-Easy", "test")
    mmlu = cdata.load_mmlu("test")
    return {"arc_easy_test": {f"arc_easy/test/{r['id']}": item_layouts(r["question"], r["choices"], layouts)
                              for r in arc},
            "mmlu_test": {f"mmlu/{r['id']}": item_layouts(r["question"], r["choices"], layouts) for r in mmlu}}


def eval_index(texts: EvalTexts, n: int = decontam.NGRAM) -> decontam.EvalIndex:
    """``common.decontam`` index of test sets given as ``{set: {id: text or texts}}`` or ``{set: [texts]}``
    (one index entry per text; an item's texts share its id)."""
    sets: dict[str, list[str]] = {}
    ids: dict[str, list[str]] = {}
    for name, items in texts.items():
        pairs = (items.items() if isinstance(items, Mapping) else
                 ((f"{name}:{i}", t) for i, t in enumerate(items)))
        flat = [(item_id, t) for item_id, ts in pairs for t in ([ts] if isinstance(ts, str) else ts)]
        sets[name], ids[name] = [t for _, t in flat], [i for i, _ in flat]
    return decontam.build_eval_index(sets, n=n, ids=ids)


def _training_texts(example: Mapping[str, Any], questions: bool) -> list[str]:
    texts = [example_text(example)]
    if questions and "question" in example:
        texts.append(str(example["question"]))   # the question alone meets short test questions whole
    return texts


def decontaminate(pool: Sequence[Mapping[str, Any]], eval_texts: EvalTexts | decontam.EvalIndex,
                  n: int = decontam.NGRAM, questions: bool = True,
                  max_ids: int = 5) -> tuple[list[dict], dict]:
    """Drop every example that overlaps a test item under ``common.decontam``'s rule (a shared
    ``n``-gram; texts under ``n`` words: see that module).

    Checked per example: ``example_text`` and, with ``questions``, a multiple-choice example's question
    alone (so a short test question asked again with other options, which shares no 13-gram, is caught
    when identical after normalisation). The plain GPT-3 convention is ``eval_texts(layouts=("plain",))``
    with ``questions=False``.

    Returns (kept examples in pool order, report). The report (JSON-ready): ``ngram``, ``n``,
    ``n_contaminated``, ``fraction``, ``n_kept``, ``eval_sets`` (items per test set) and per source in
    ``sources``: ``n``, ``n_contaminated``, ``fraction``, ``by_eval_set`` (examples overlapping each test
    set), ``example_ids`` (the first ``max_ids`` contaminated ids, pool order) and ``matches`` (for
    those: the test item ids they overlap).
    """
    index = eval_texts if isinstance(eval_texts, decontam.EvalIndex) else eval_index(eval_texts, n)
    if index.n != n:
        raise ValueError(f"the eval index uses {index.n}-grams, asked for n={n}")
    owner, texts = [], []
    for k, ex in enumerate(pool):
        for t in _training_texts(ex, questions):
            owner.append(k)
            texts.append(t)
    # per example: the distinct test item ids it overlaps, in index order
    hit_ids: list[dict[str, str]] = [{} for _ in pool]
    for k, positions in zip(owner, decontam.eval_items_hit(texts, index)):
        for i in positions:
            hit_ids[k][index.item_ids[i]] = index.set_names[index.item_set[i]]
    sizes: dict[str, set[str]] = {name: set() for name in index.set_names}
    for item_id, s in zip(index.item_ids, index.item_set.tolist()):
        sizes[index.set_names[s]].add(item_id)
    sources: dict[str, dict] = {}
    for ex, hits in zip(pool, hit_ids):
        rep = sources.setdefault(ex["source"], {"n": 0, "n_contaminated": 0, "by_eval_set": dict.fromkeys(sizes, 0),
                                                "example_ids": [], "matches": {}})
        rep["n"] += 1
        if not hits:
            continue
        rep["n_contaminated"] += 1
        for name in set(hits.values()):
            rep["by_eval_set"][name] += 1
        if len(rep["example_ids"]) < max_ids:
            rep["example_ids"].append(ex["id"])
            rep["matches"][ex["id"]] = list(hits)[:max_ids]
    for rep in sources.values():
        rep["fraction"] = rep["n_contaminated"] / rep["n"]
    order = {s: i for i, s in enumerate(SOURCES)}   # report in the fixed source order, not the pool's
    sources = dict(sorted(sources.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    kept = [dict(ex) for ex, hits in zip(pool, hit_ids) if not hits]
    n_cont = len(pool) - len(kept)
    report = {"ngram": n, "questions": questions, "n": len(pool), "n_contaminated": n_cont,
              "fraction": n_cont / max(len(pool), 1), "n_kept": len(kept),
              "eval_sets": {name: len(v) for name, v in sizes.items()}, "sources": sources}
    log.info("decontamination: dropped %d of %d examples (%s)", n_cont, len(pool),
             ", ".join(f"{s} {r['n_contaminated']}/{r['n']}" for s, r in sources.items()))
    return kept, report


# ----------------------------------------------------------------------------- LESS validation
def split_validation(pool: Sequence[Mapping[str, Any]], per_subtask: int = 5, seed: int = 0,
                     mmlu_split: str = "dev", answer_format: str = "auto", prompt_format: str = "lettered",
                     subjects: Sequence[str] | None = None) -> tuple[list[dict], dict[str, list[dict]]]:
    """LESS's target-task examples per subtask, and the pool without them.

    Validation = ``per_subtask`` seeded draws from ARC-Easy validation (subtask ``"arc_easy"``) and from
    each MMLU subject of ``mmlu_split`` (``"dev"``: 5 per subject, so ``per_subtask >= 5`` takes all;
    ``"val"``: the MMLU validation split), keyed by ``example["subject"]``. ``subjects`` restricts MMLU
    subjects. Every pool example from those splits, drawn or not (e.g. source ``mmlu_dev`` with
    ``mmlu_split="dev"``), is removed from the returned pool: nothing is in both.
    """
    if per_subtask < 1:
        raise ValueError(f"per_subtask must be >= 1, got {per_subtask}")
    if mmlu_split not in ("dev", "val"):
        raise ValueError(f"mmlu_split must be dev|val, got {mmlu_split!r}")
    arc = [mc_example(r, "arc_easy", answer_format, prompt_format, split="validation")
           for r in cdata.load_arc("ARC-Easy", "validation")]
    mmlu = [mc_example(r, "mmlu_dev", answer_format, prompt_format)
            for r in cdata.load_mmlu(mmlu_split, None if subjects is None else list(subjects))]
    if mmlu_split == "val":   # same split name in the id and source as in the rows' ids
        for ex in mmlu:
            ex["source"] = "mmlu_val"
    by_subtask: dict[str, list[dict]] = {}
    for ex in arc + mmlu:
        by_subtask.setdefault(ex["subject"], []).append(ex)
    validation = {}
    for subtask, examples in by_subtask.items():
        k = min(per_subtask, len(examples))
        keep = sorted(random.Random(f"validation:{seed}:{subtask}").sample(range(len(examples)), k))
        validation[subtask] = [examples[i] for i in keep]
    # the whole validation split is reserved, drawn or not: none of its rows stays in the pool
    val_ids = {ex["id"] for exs in by_subtask.values() for ex in exs}
    kept = [dict(ex) for ex in pool if ex["id"] not in val_ids]
    if len(kept) < len(pool):
        log.info("split_validation: %d pool example(s) of the validation splits removed from the pool",
                 len(pool) - len(kept))
    return kept, validation


# ------------------------------------------------------------------------------------- budgets
def budget_sizes(pool_size: int, fractions: Sequence[float] = (0.01, 0.05, 0.1),
                 counts: Sequence[int] = ()) -> list[int]:
    """Selection budgets (numbers of training examples), ascending and distinct: ``floor(f * pool_size)``
    (at least 1) for each fraction, as LESS's ``int(percentage * n)``, plus the fixed ``counts``."""
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    bad = [f for f in fractions if not 0 < f <= 1] + [c for c in counts if not 1 <= c <= pool_size]
    if bad:
        raise ValueError(f"budgets must be fractions in (0, 1] or counts in [1, {pool_size}], got {bad}")
    # + 1e-9: 0.29 * 100 is 28.999...
    sizes = {max(1, math.floor(f * pool_size + 1e-9)) for f in fractions} | {int(c) for c in counts}
    return sorted(sizes)

"""Stage `decontam`: how many documents of each corpus share a word n-gram (13) with the evaluation sets.

Evaluation sets (offline data root, `common.data`): ARC = ARC-Easy + ARC-Challenge, every split of
`decontam.arc_splits` that is present (absent ones are listed in decontam.json, not fatal); MMLU = the
`decontam.mmlu_splits` (test). Matching is `common.decontam` (lower-case, punctuation deleted, 13-grams of
words; an item of fewer than 13 words matches as a whole, and from 8 words on also as a contiguous span of a
document). An item is indexed in each of `decontam.layouts`, as exp_distill_data does: "plain" = question
and choices one per line (the GPT-3 check), "lettered" = the question followed by "A. choice" lines,
"question" = the question alone (catches a quoted question whose options are missing or reordered).

Outputs: decontam.parquet, one row per language x source x genre (and language "all") x eval set (arc,
mmlu, any): n_docs, n_contaminated, frac_contaminated, n_eval_hit (distinct items overlapped), n_eval;
decontam_docs.parquet, the rows of metrics.parquet in order: id, decontam_arc, decontam_mmlu (bool),
decontam_items (the first matched item ids, ";"-joined); decontam.json (eval sets, missing splits, example
ids). Rows: table `curriculum_decontam`, method = eval set, metrics n_contaminated and frac_contaminated.
The eval files are not part of the stage's hash: after changing them, rerun with --stage decontam --force.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd

from common import decontam
from common.stages import StageContext
from exp_curriculum.config import Config

EVAL_SETS = ("arc", "mmlu")
LETTERS = "ABCDEFGHIJ"


def item_texts(question: str, choices: Sequence[str], layouts: Sequence[str]) -> list[str]:
    """The texts one multiple-choice item is indexed as (module docstring)."""
    forms = {"plain": "\n".join([question, *choices]),
             "lettered": question.strip() + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices)),
             "question": question}
    return [forms[x] for x in layouts]


def load_eval_items(cfg: Config) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """({"arc": {item id: texts}, "mmlu": {...}}, the (subset, split) pairs not present offline)."""
    from common import data as cdata

    items: dict[str, dict[str, list[str]]] = {name: {} for name in EVAL_SETS}
    missing: list[str] = []
    d = cfg.decontam
    # (eval set, what is loaded, id prefix, loader); MMLU ids already name subject and split ("anatomy/test/12")
    sources = [("arc", f"{sub}/{split}", f"{sub}/{split}/", lambda sub=sub, split=split: cdata.load_arc(sub, split))
               for sub in d.arc_subsets for split in d.arc_splits]
    sources += [("mmlu", f"mmlu/{split}", "mmlu/", lambda split=split: cdata.load_mmlu(split))
                for split in d.mmlu_splits]
    for name, what, prefix, load in sources:
        try:
            rows = load()
        except cdata.DatasetNotAvailableError:
            missing.append(what)
            continue
        for r in rows:
            items[name][prefix + r["id"]] = item_texts(r["question"], r["choices"], d.layouts)
    if not any(items.values()):
        raise cdata.DatasetNotAvailableError(
            f"decontam: none of the evaluation sets is under the data root (missing: {', '.join(missing)}); put "
            "ARC under $LLM4ALL_DATA/arc/<subset>/ and MMLU under $LLM4ALL_DATA/mmlu/<split>/, or leave the "
            "stage out (stages=[...])")
    return items, missing


def eval_index(items: dict[str, dict[str, list[str]]], n: int) -> decontam.EvalIndex:
    """One index entry per text; an item's texts share its id."""
    texts = {name: [t for ts in its.values() for t in ts] for name, its in items.items() if its}
    ids = {name: [i for i, ts in its.items() for _ in ts] for name, its in items.items() if its}
    return decontam.build_eval_index(texts, n=n, ids=ids)


def document_hits(texts: Sequence[str], index: decontam.EvalIndex) -> pd.DataFrame:
    """Per document: which eval sets it overlaps and the ids of the items it overlaps (index order)."""
    hits = decontam.eval_items_hit(texts, index)
    out = {f"decontam_{name}": [any(index.item_set[i] == s for i in h) for h in hits]
           for s, name in enumerate(index.set_names)}
    for name in EVAL_SETS:                      # an eval set absent offline: no document can overlap it
        out.setdefault(f"decontam_{name}", [False] * len(hits))
    out["decontam_items"] = [";".join(dict.fromkeys(index.item_ids[i] for i in h)) for h in hits]
    return pd.DataFrame(out)


def summarise(meta: pd.DataFrame, flags: pd.DataFrame, index: decontam.EvalIndex) -> pd.DataFrame:
    """decontam.parquet: one row per language x source x genre (plus language "all") x eval set."""
    items = flags["decontam_items"].str.split(";")
    df = meta[["language", "source", "genre"]].assign(
        arc=flags["decontam_arc"].to_numpy(), mmlu=flags["decontam_mmlu"].to_numpy(), items=items.to_numpy())
    df["any"] = df["arc"] | df["mmlu"]
    set_of = dict(zip(index.item_ids, (index.set_names[s] for s in index.item_set.tolist())))
    n_eval = {name: len({i for i, s in set_of.items() if s == name}) for name in EVAL_SETS}
    n_eval["any"] = len(set_of)
    rows = []
    groups = [((lg, src, ge), g) for (lg, src, ge), g in df.groupby(["language", "source", "genre"])]
    groups.append((("all", "all", "all"), df))
    for (lg, src, ge), g in groups:
        for name in (*EVAL_SETS, "any"):
            hit = {i for its in g["items"] for i in its if i and (name == "any" or set_of[i] == name)}
            n_cont = int(g[name].sum())
            rows.append({"language": lg, "source": src, "genre": ge, "eval_set": name, "n_docs": len(g),
                         "n_contaminated": n_cont, "frac_contaminated": n_cont / len(g),
                         "n_eval_hit": len(hit), "n_eval": n_eval[name]})
    return pd.DataFrame(rows)


def stage_decontam(ctx: StageContext) -> None:
    from exp_curriculum.run import read_parquet

    t0 = time.perf_counter()
    cfg = ctx.cfg
    df = read_parquet(ctx, "metrics", "metrics.parquet", columns=["id", "text", "language", "source", "genre"])
    items, missing = load_eval_items(cfg)
    index = eval_index(items, cfg.decontam.ngram)
    flags = document_hits(df["text"].tolist(), index)
    pd.concat([df[["id"]], flags], axis=1).to_parquet(ctx.path("decontam_docs.parquet"))
    summary = summarise(df, flags, index)
    summary.to_parquet(ctx.path("decontam.parquet"))
    any_hit = flags["decontam_arc"] | flags["decontam_mmlu"]
    examples = {f"{lg}/{src}": g["id"].head(cfg.decontam.max_examples).tolist()
                for (lg, src), g in df[any_hit.to_numpy()].groupby(["language", "source"])}
    ctx.save_json("decontam.json", {"ngram": cfg.decontam.ngram, "layouts": cfg.decontam.layouts,
                                    "eval_items": {k: len(v) for k, v in items.items()}, "missing": missing,
                                    "n_docs": len(df), "n_contaminated": int(any_hit.sum()),
                                    "examples": examples, "seconds": time.perf_counter() - t0})
    for r in summary.itertuples(index=False):
        params = {"language": r.language, "source": r.source, "genre": r.genre, "ngram": cfg.decontam.ngram,
                  "n_eval_hit": r.n_eval_hit, "n_eval": r.n_eval}
        ctx.log(table="curriculum_decontam", method=r.eval_set, metric="n_contaminated",
                value=r.n_contaminated, n=r.n_docs, params=params)
        ctx.log(table="curriculum_decontam", method=r.eval_set, metric="frac_contaminated",
                value=r.frac_contaminated, n=r.n_docs, params=params)
    tot = summary.query("language == 'all'").set_index("eval_set")["n_contaminated"].to_dict()
    absent = f"; not present offline: {', '.join(missing)}" if missing else ""
    print(f"decontam: {tot['any']} of {len(df)} documents share a {cfg.decontam.ngram}-gram with ARC "
          f"({tot['arc']}) or MMLU ({tot['mmlu']}); {sum(map(len, items.values()))} eval items{absent}; "
          f"{time.perf_counter() - t0:.0f} s")

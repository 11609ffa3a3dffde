"""Discretisation of a distilled set (stage ``project``): nearest-token ids -> text, and a readable report.

The learnable prompt vectors are replaced by their nearest rows of the distiller's input-embedding matrix
("finding its nearest neighbor ID to achieve cross-architecture transfer", arXiv 2504.09818); the ids are
decoded with the distiller's tokenizer, and a student of another architecture re-tokenises that text with
its own tokenizer (``common.sft`` does, when it fine-tunes on the examples).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from exp_distill_data.distill import IGNORE_INDEX, nearest_tokens


def prompt_ids(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's prompt tokens (label -100, not padding)."""
    keep = (labels == IGNORE_INDEX) & attention_mask.bool()
    return [row[k].tolist() for row, k in zip(input_ids, keep)]


def project_synthetic(syn: Mapping[str, torch.Tensor], embedding: torch.Tensor, tokenizer: Any,
                      originals: Sequence[Mapping], metric: str = "l2") -> dict:
    """The distilled examples as text and the projection's statistics.

    ``syn``: a distill-stage ``synthetic.pt`` (``embeds`` final, ``init_embeds`` initial, ``learn_mask``...);
    ``originals``: the real examples it started from (their answers are kept: they were never learnt).
    Stats: mean / max distance of the learnt vectors to their nearest token before and after distillation,
    the fraction of positions whose nearest token changed, the fraction of prompts still equal to the real
    prompt, and the fraction whose decoded text re-tokenises to exactly the projected ids.
    """
    learn = syn["learn_mask"]
    ids_after, d_after = nearest_tokens(syn["embeds"][learn], embedding, metric)
    ids_before, d_before = nearest_tokens(syn["init_embeds"][learn], embedding, metric)
    projected = syn["input_ids"].clone()
    projected[learn] = ids_after
    real = prompt_ids(syn["input_ids"], syn["labels"], syn["attention_mask"])
    new = prompt_ids(projected, syn["labels"], syn["attention_mask"])
    special = set(tokenizer.all_special_ids)
    examples, same_text, round_trip = [], 0, 0
    per_row = learn.sum(1).tolist()
    dist_rows = torch.split(d_after, per_row)
    for j, (ex, p_real, p_new) in enumerate(zip(originals, real, new)):
        text = tokenizer.decode(p_new, skip_special_tokens=True)
        body = [t for t in p_new if t not in special]
        round_trip += list(tokenizer(text, add_special_tokens=False)["input_ids"]) == body
        same_text += text == tokenizer.decode(p_real, skip_special_tokens=True)
        examples.append({"prompt": text, "answer": ex.get("answer", ex.get("output")),
                         "real_prompt": tokenizer.decode(p_real, skip_special_tokens=True),  # as tokenised (cut)
                         "mean_nn_distance": float(dist_rows[j].mean()) if per_row[j] else 0.0})
    n = max(len(examples), 1)
    positions = max(int(learn.sum()), 1)
    stats = {"positions": int(learn.sum()), "examples": len(examples),
             "nn_distance_before_mean": float(d_before.mean()) if d_before.numel() else 0.0,
             "nn_distance_after_mean": float(d_after.mean()) if d_after.numel() else 0.0,
             "nn_distance_after_max": float(d_after.max()) if d_after.numel() else 0.0,
             "changed_fraction": float((ids_after != ids_before).sum()) / positions,
             "prompt_unchanged_fraction": same_text / n,
             "retokenise_exact_fraction": round_trip / n}
    return {"examples": examples, "stats": stats}


def inspection_markdown(sections: Sequence[tuple[dict, dict]], per_set: int = 5, max_chars: int = 400) -> str:
    """A readable report: per distilled set, its statistics and the first ``per_set`` prompts next to the
    real prompts they started from."""
    lines = ["# Distilled sets: what trajectory matching produced", "",
             "Each set starts from real pool examples (the random baseline's subset of the same seed); only the "
             "prompt vectors are learnt, the answers stay fixed. The distilled prompt is the decoded nearest-token "
             "text a student fine-tunes on. Distances are to the nearest row of the distiller's input-embedding "
             "matrix (the projection metric).", ""]

    def cell(text: Any) -> str:
        t = str(text)
        t = t if len(t) <= max_chars else t[:max_chars] + " …"
        return html.escape(t).replace("|", "&#124;").replace("\n", "<br>")

    for job, res in sections:
        s = res["stats"]
        lines += [f"## {job['name']}", "", "| statistic | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in s.items()]
        lines += ["", "| # | real prompt (start) | distilled prompt (nearest tokens) | answer | mean distance |",
                  "|---|---|---|---|---|"]
        for i, ex in enumerate(res["examples"][:per_set]):
            lines.append(f"| {i} | {cell(ex['real_prompt'])} | {cell(ex['prompt'])} | {cell(ex['answer'])} | "
                         f"{ex['mean_nn_distance']:.4g} |")
        lines.append("")
    return "\n".join(lines) + "\n"

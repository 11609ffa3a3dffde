"""The paper-layout table: mean ± std over seeds with 95 % t-intervals, and paired differences.

Rows of ``distill_summary`` (one per setting x method x budget x task x metric): ``<metric>_mean`` (stderr =
std / sqrt(n)), ``<metric>_std``, ``<metric>_ci95_low`` / ``_high``; paired differences (``PAIRED``: by seed,
same setting and budget, e.g. ``less-random``, ``ours-less``, ``ours-ours_noreg``) and ``full-base`` (each
full seed minus the base model) as ``<metric>_diff_*``; for full - base also the question-level standard
error of the difference and its z (``_question_level``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from common.stats import mean_ci

TABLE = "distill_summary"
METRICS = ("acc", "acc_norm")
# (a, b): rows "a-b" of the seed-paired differences. ours starts from random's subset of the same seed, so
# ours - random is what distillation adds to its initial data; ours - ours_noreg is the regulariser's effect;
# ours_emb - ours is what the projection to tokens costs (on the distiller, whose text student is X -> X).
PAIRED = (("less", "random"), ("ours", "random"), ("ours", "less"), ("ours_noreg", "random"),
          ("ours_noreg", "less"), ("ours", "ours_noreg"), ("ours_emb", "ours"), ("ours_noreg_emb", "ours_noreg"))


def _rows(method: str, metric: str, values: list[float], params: dict, diff: bool = False) -> list[dict]:
    s = mean_ci(values)
    tag = f"{metric}_diff" if diff else metric
    out = [{"table": TABLE, "method": method, "metric": f"{tag}_mean", "value": s["mean"],
            "stderr": s["se"] if s["n"] > 1 else None, "n": s["n"], "params": params}]
    for k in ("std", "low", "high"):
        name = {"std": "std", "low": "ci95_low", "high": "ci95_high"}[k]
        out.append({"table": TABLE, "method": method, "metric": f"{tag}_{name}", "value": s[k], "n": s["n"],
                    "params": params})
    return out


def _question_level(metric: str, base: dict, full: list[dict], params: dict) -> list[dict]:
    """full - base resolved against question sampling: each full seed's difference over the unpaired
    standard error sqrt(se_full^2 + se_base^2) of lm-eval (conservative: the two models answer the same
    questions, so the paired error is smaller). Rows ``<metric>_diff_se_questions`` and ``<metric>_diff_z``
    (the seed-mean difference over the mean of the errors)."""
    se_b = base.get(f"{metric}_stderr")
    ses = [f.get(f"{metric}_stderr") for f in full]
    if se_b is None or not full or any(x is None or not math.isfinite(x) for x in [se_b, *ses]):
        return []
    se = sum(math.sqrt(x ** 2 + se_b ** 2) for x in ses) / len(ses)
    diff = sum(f[metric] - base[metric] for f in full) / len(full)
    kw = {"table": TABLE, "method": "full-base", "n": len(full), "params": params}
    out = [{**kw, "metric": f"{metric}_diff_se_questions", "value": se}]
    return out + ([{**kw, "metric": f"{metric}_diff_z", "value": diff / se}] if se > 0 else [])


def summary_rows(cfg: Any, base: dict, runs: list[dict], scores: dict) -> list[dict]:
    """``base``: trainer -> task -> metrics; ``runs``: planned runs (train stage); ``scores``: run -> task ->
    metrics. Returns the rows (``StageContext.log`` keyword arguments)."""
    per: dict[tuple, list[float]] = defaultdict(list)       # (setting, method, budget, task, metric) -> values
    by_seed: dict[tuple, float] = {}
    for r in runs:
        for sel, trainer in r["settings"]:
            setting = f"{sel}->{trainer}"
            for task, sc in scores[r["name"]].items():
                for m in METRICS:
                    key = (setting, r["method"], r["budget"], task, m)
                    per[key].append(float(sc[m]))
                    by_seed[(*key, r["seed"])] = float(sc[m])
    rows: list[dict] = []
    for (setting, method, budget, task, m), vals in sorted(per.items()):
        rows += _rows(method, m, vals, {"setting": setting, "budget": budget, "task": task})
    # paired differences
    for (setting, method, budget, task, m) in sorted(per):
        p = {"setting": setting, "budget": budget, "task": task}
        ablation = [(method, "ours")] if method.startswith("ours[") else []  # an ablation vs ours, same seed
        for a, b in [*PAIRED, *ablation]:
            if method != a:
                continue
            pairs = [(v, by_seed.get((setting, b, budget, task, m, seed)))
                     for (*k, seed), v in by_seed.items() if tuple(k) == (setting, a, budget, task, m)]
            diffs = [x - y for x, y in pairs if y is not None]
            if diffs:
                rows += _rows(f"{a}-{b}", m, diffs, p, diff=True)
        if method == "full":
            trainer = setting.split("->")[1]
            floor = base.get(trainer, {}).get(task, {}).get(m)
            if floor is not None:
                diffs = [v - float(floor) for v in per[(setting, method, budget, task, m)]]
                rows += _rows("full-base", m, diffs, p, diff=True)
                rows += _question_level(m, base[trainer][task], [scores[r["name"]][task] for r in runs
                                        if r["method"] == "full" and r["budget"] == budget
                                        and [setting.split("->")[0], trainer] in r["settings"]], p)
    return rows

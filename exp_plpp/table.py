"""The summary table: per setting and method, mean ± std over seeds with 95 % t-intervals, and the paired
differences ``<method>_plpp - <method>`` (same seed, hence the same few-shot images and context init) that
test PLPP's claim; an ablation ``coop_plpp[...]`` is paired with coop and with coop_plpp.

Rows of ``plpp_summary``: ``<metric>_mean`` (stderr = std / sqrt(n)), ``_std``, ``_ci95_low`` / ``_high``,
and for the differences ``<metric>_diff_*``; params ``setting`` (b2n, fewshot, xd, dg, source), ``dataset``
(the evaluated dataset), ``shots``.
"""

from __future__ import annotations

from collections import defaultdict

from common.stats import mean_ci

TABLE = "plpp_summary"
SETTINGS = {"plpp_b2n": "b2n", "plpp_ablation": "b2n", "plpp_fewshot": "fewshot", "plpp_xd": "xd", "plpp_dg": "dg",
            "plpp_source": "source"}
PLPP_SUFFIX = "_plpp"


def _partners(method: str) -> list[str]:
    """The methods ``method`` is paired with: coop_plpp -> [coop]; coop_plpp[k=1] -> [coop, coop_plpp]."""
    plain = method.split("[", 1)[0]
    if not plain.endswith(PLPP_SUFFIX):
        return []
    return [plain[:-len(PLPP_SUFFIX)]] + ([plain] if plain != method else [])


def _dataset(params: dict) -> str:
    return str(params.get("dataset", params.get("target")))


def _stat_rows(method: str, metric: str, values: list[float], params: dict) -> list[dict]:
    s = mean_ci(values)
    out = [{"table": TABLE, "method": method, "metric": f"{metric}_mean", "value": s["mean"],
            "stderr": s["se"] if s["n"] > 1 else None, "n": s["n"], "params": params}]
    for key, name in (("std", "std"), ("low", "ci95_low"), ("high", "ci95_high")):
        out.append({"table": TABLE, "method": method, "metric": f"{metric}_{name}", "value": s[key], "n": s["n"],
                    "params": params})
    return out


def summary_rows(rows: list[dict]) -> list[dict]:
    """Summary rows from the prompt-learning stages' rows (``StageContext.log`` keyword dicts)."""
    values: dict[tuple, dict[int, float]] = defaultdict(dict)   # (setting, dataset, shots, method, metric) -> seed -> v
    for r in rows:
        setting = SETTINGS.get(r.get("table"))
        if setting is None or r.get("seed") is None:
            continue
        p = r.get("params") or {}
        values[(setting, _dataset(p), p.get("shots"), r["method"], r["metric"])][int(r["seed"])] = float(r["value"])
    out: list[dict] = []
    for (setting, dataset, shots, method, metric), by_seed in sorted(values.items(), key=str):
        params = {"setting": setting, "dataset": dataset, "shots": shots}
        out += _stat_rows(method, metric, list(by_seed.values()), params)
        for other in _partners(method):   # paired by seed: PLPP vs its base method; an ablation vs both
            base = values.get((setting, dataset, shots, other, metric), {})
            seeds = sorted(set(by_seed) & set(base))
            if seeds:
                diffs = [by_seed[s] - base[s] for s in seeds]
                out += _stat_rows(f"{method}-{other}", f"{metric}_diff", diffs, params)
    return out

"""Arms of the curriculum study: which sequences a run trains on (its pool) and in which order.

An arm is a short string, so that a researcher can add one from the command line
(``study.arms=[random,easy_to_hard:compression,competence:mtld:root=1]``):

    random                                  the baseline: the seed's base pool, shuffled
    <strategy>:<metric>[:key=value...]      an ordering of the base pool (common.curriculum strategies;
                                            keys are OrderConfig fields, e.g. root=1, curriculum_fraction=0.2)
    select:<method>                         equal-token selection from a larger candidate set, then shuffled:
                                            random, d4, askllm, askllm_norm, density
    mix:<key>=<value>[:metric=<m>]          a different composition of the budget, shuffled:
                                            en_fraction=0.25 | alpha=0.3 (p_lang ∝ n_lang^alpha) |
                                            hard_fraction=0.75 (share from the harder half of <m>)

The base pool of seed s is the same for every ordering arm (a seeded random choice of ``budget`` sequences
with ``en_fraction`` of them English), so paired differences between arms at one seed are order effects
only. Difficulty is the metric's empirical CDF *within each language of the pool*.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from common.config import parse_field_overrides
from common.curriculum import STRATEGIES, OrderConfig, difficulty_cdf, make_order
from exp_curriculum.study_data import METRICS, difficulty_scores

SELECTIONS = ("random", "d4", "askllm", "askllm_norm", "density")
MIX_KEYS = ("en_fraction", "alpha", "hard_fraction")


@dataclass(frozen=True)
class Arm:
    spec: str                                   # the string it was parsed from: its name in every table
    kind: str                                   # order | select | mix
    order: OrderConfig = field(default_factory=OrderConfig)
    metric: str = ""
    selection: str = ""
    mix: dict = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.spec == "random"


def parse_arm(spec: str) -> Arm:
    """An Arm from its string; a clear error naming the arm for anything unknown."""
    parts = [p.strip() for p in str(spec).split(":")]
    head, rest = parts[0], parts[1:]
    where = f"study.arms entry '{spec}'"
    if head == "select":
        if len(rest) != 1 or rest[0] not in SELECTIONS:
            raise ValueError(f"{where}: expected select:<{'|'.join(SELECTIONS)}>")
        return Arm(spec=spec, kind="select", selection=rest[0])
    if head == "mix":
        kv = dict(p.split("=", 1) for p in rest if "=" in p)
        if len(kv) != len(rest) or not kv:
            raise ValueError(f"{where}: expected mix:<key>=<value>[:metric=<m>] with key in {MIX_KEYS}")
        metric = kv.pop("metric", "")
        if len(kv) != 1 or next(iter(kv)) not in MIX_KEYS:
            raise ValueError(f"{where}: one of {MIX_KEYS} expected, got {sorted(kv)}")
        key, value = next(iter(kv.items()))
        try:
            val = float(value)
        except ValueError:
            raise ValueError(f"{where}: {key} must be a number, got {value!r}") from None
        if key == "hard_fraction" and metric not in METRICS:
            raise ValueError(f"{where}: hard_fraction needs :metric=<{'|'.join(METRICS)}>")
        if key != "alpha" and not 0.0 <= val <= 1.0:
            raise ValueError(f"{where}: {key} must be in [0, 1], got {val}")
        return Arm(spec=spec, kind="mix", metric=metric, mix={key: val})
    if head == "random" and not rest:
        return Arm(spec=spec, kind="order")
    if head not in STRATEGIES or head == "random":
        raise ValueError(f"{where}: unknown arm kind '{head}': expected random, select, mix or one of "
                         f"{', '.join(s for s in STRATEGIES if s != 'random')}")
    if not rest or rest[0] not in METRICS:
        raise ValueError(f"{where}: '{head}' needs a difficulty metric: {head}:<{'|'.join(METRICS)}>")
    extra = parse_field_overrides(",".join(rest[1:]), OrderConfig, where) if rest[1:] else {}
    if "strategy" in extra:
        raise ValueError(f"{where}: the strategy is the arm's first part, not a key")
    order = OrderConfig(strategy=head, **extra)
    order.validate()
    return Arm(spec=spec, kind="order", order=order, metric=rest[0])


def language_quota(counts: dict[str, int], budget: int, en_fraction: float | None = None,
                   alpha: float | None = None) -> dict[str, int]:
    """Sequences per language: a fixed English share, or temperature sampling p ∝ n^alpha over the
    available counts (alpha = 1: natural proportions, 0: uniform). Rounded so the total is ``budget``."""
    langs = sorted(counts)
    if alpha is not None:
        w = np.array([counts[lg] ** alpha for lg in langs], dtype=np.float64)
    elif len(langs) == 1:
        w = np.ones(1)
    else:
        share = 0.5 if en_fraction is None else en_fraction
        w = np.array([share if lg == "en" else (1 - share) / (len(langs) - 1) for lg in langs])
    p = w / w.sum()
    quota = np.floor(p * budget).astype(int)
    quota[np.argsort(-(p * budget - quota), kind="stable")[: budget - quota.sum()]] += 1
    out = dict(zip(langs, quota.tolist()))
    short = {lg: (out[lg], counts[lg]) for lg in langs if out[lg] > counts[lg]}
    if short:
        raise ValueError(f"the budget needs more sequences than there are: {short} (quota, available); "
                         "lower study.budget_sequences or the share")
    return out


def _by_language(table: pd.DataFrame, idx: np.ndarray) -> dict[str, np.ndarray]:
    lang = table["language"].to_numpy()[idx]
    return {lg: idx[lang == lg] for lg in sorted(set(lang))}


def base_pool(table: pd.DataFrame, budget: int, en_fraction: float, seed: int) -> np.ndarray:
    """The seed's base pool: a seeded random choice of candidate sequences with the English share."""
    cand = np.flatnonzero(table["role"].to_numpy() == "candidate")
    groups = _by_language(table, cand)
    quota = language_quota({lg: len(v) for lg, v in groups.items()}, budget, en_fraction)
    rng = np.random.default_rng([seed, 10])
    return np.sort(np.concatenate([rng.choice(groups[lg], quota[lg], replace=False) for lg in groups]))


def selection_candidates(table: pd.DataFrame, budget: int, en_fraction: float, factor: float) -> np.ndarray:
    """The fixed candidate set of the selection arms: ``factor`` x the budget per language (seed-independent,
    so that model-based scores are computed once)."""
    return base_pool(table, min(int(round(factor * budget)), int((table["role"] == "candidate").sum())),
                     en_fraction, seed=12345)


def select_pool(table: pd.DataFrame, cands: np.ndarray, budget: int, en_fraction: float, method: str,
                scores: pd.DataFrame, seed: int) -> np.ndarray:
    """``budget`` sequences chosen from ``cands`` by ``method``, per language quota. ``scores``: columns
    askllm, askllm_norm, density, d4_rank indexed like ``cands`` (stage study_select)."""
    groups = _by_language(table, cands)
    quota = language_quota({lg: len(v) for lg, v in groups.items()}, budget, en_fraction)
    pos = {int(c): i for i, c in enumerate(cands)}
    rng = np.random.default_rng([seed, 11])
    out = []
    for lg, members in groups.items():
        k, rows = quota[lg], np.array([pos[int(c)] for c in members])
        if method == "random":
            pick = rng.choice(members, k, replace=False)
        elif method in ("askllm", "askllm_norm"):    # top-k by P(yes) (ties: stable)
            pick = members[np.argsort(-scores[method].to_numpy()[rows], kind="stable")[:k]]
        elif method == "d4":                          # D4's keep order: kept first, most prototypical pruned
            pick = members[np.argsort(scores["d4_rank"].to_numpy()[rows], kind="stable")[:k]]
        elif method == "density":                     # inverse-propensity sampling, p ∝ 1 / density
            w = 1.0 / np.maximum(scores["density"].to_numpy()[rows], 1e-12)
            pick = rng.choice(members, k, replace=False, p=w / w.sum())
        else:
            raise ValueError(f"unknown selection '{method}': expected one of {', '.join(SELECTIONS)}")
        out.append(pick)
    return np.sort(np.concatenate(out))


def mix_pool(table: pd.DataFrame, arm: Arm, budget: int, en_fraction: float, seed: int) -> np.ndarray:
    cand = np.flatnonzero(table["role"].to_numpy() == "candidate")
    groups = _by_language(table, cand)
    counts = {lg: len(v) for lg, v in groups.items()}
    rng = np.random.default_rng([seed, 13])
    if "hard_fraction" in arm.mix:
        quota = language_quota(counts, budget, en_fraction)
        h = arm.mix["hard_fraction"]
        raw = difficulty_scores(table, arm.metric)
        out = []
        for lg, members in groups.items():
            d = difficulty_cdf(raw[members])
            hard, easy = members[d > 0.5], members[d <= 0.5]
            n_hard = int(round(h * quota[lg]))
            if n_hard > len(hard) or quota[lg] - n_hard > len(easy):
                raise ValueError(f"{arm.spec}: language '{lg}' has {len(hard)} hard / {len(easy)} easy "
                                 f"sequences, fewer than the {n_hard} / {quota[lg] - n_hard} asked")
            out += [rng.choice(hard, n_hard, replace=False), rng.choice(easy, quota[lg] - n_hard, replace=False)]
        return np.sort(np.concatenate(out))
    quota = language_quota(counts, budget, arm.mix.get("en_fraction"), arm.mix.get("alpha"))
    return np.sort(np.concatenate([rng.choice(groups[lg], quota[lg], replace=False) for lg in groups]))


def arm_pool(table: pd.DataFrame, arm: Arm, budget: int, en_fraction: float, seed: int,
             cands: np.ndarray | None = None, select_scores: pd.DataFrame | None = None) -> np.ndarray:
    """Row indices (into ``table``) of the sequences the arm trains on."""
    if arm.kind == "select":
        if cands is None or select_scores is None:
            raise ValueError(f"arm '{arm.spec}' needs the selection scores (stage study_select)")
        return select_pool(table, cands, budget, en_fraction, arm.selection, select_scores, seed)
    if arm.kind == "mix":
        return mix_pool(table, arm, budget, en_fraction, seed)
    return base_pool(table, budget, en_fraction, seed)


def arm_order(table: pd.DataFrame, pool: np.ndarray, arm: Arm, n_samples: int, seed: int,
              global_batch: int) -> np.ndarray:
    """Positions into ``pool`` in training order (orderings use the per-language difficulty CDF)."""
    if arm.kind != "order" or arm.is_baseline:
        return make_order(np.zeros(len(pool)), n_samples, OrderConfig(strategy="random"), seed, global_batch)
    raw = difficulty_scores(table.iloc[pool], arm.metric)
    d = difficulty_cdf(raw, groups=table["language"].to_numpy()[pool])
    return make_order(d, n_samples, arm.order, seed, global_batch)


def describe(arm: Arm) -> dict:
    """Flat params of an arm for the results table."""
    out = {"arm_kind": arm.kind, "metric": arm.metric or "none"}
    if arm.kind == "order":
        out.update({f"order_{k}": v for k, v in dataclasses.asdict(arm.order).items()})
    if arm.selection:
        out["selection"] = arm.selection
    out.update({f"mix_{k}": v for k, v in arm.mix.items()})
    return out

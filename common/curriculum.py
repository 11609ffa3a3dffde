"""Curriculum orderings of a training set, as one deterministic, resumable torch ``Sampler``.

An ordering is computed once, up front, as the full sequence of example indices the run will consume
(``make_order``); the sampler only replays it from a position. So a run killed and resumed from a checkpoint
continues with exactly the examples the uninterrupted run would have seen (``common.train`` restores the
position from its checkpoint; a transformers ``Trainer`` skips the consumed batches itself on resume), and
the same (difficulty, strategy, seed) always gives the same order, whatever the world size: global step k
takes positions ``[k*B, (k+1)*B)`` of the order (``common.train.GlobalBatchSampler``).

Difficulty is an empirical CDF in [0, 1] (Platanios et al. 2019), computed within groups when asked
(``difficulty_cdf(scores, groups=language)``: per-language quantiles, so "easy" means easy *for its
language*). Strategies (``OrderConfig.strategy``):

* ``random``        a fresh seeded permutation per pass over the data (the baseline);
* ``easy_to_hard`` / ``hard_to_easy``   sorted by difficulty within each pass (ties in seeded random order);
* ``competence``    Platanios: at step t sample uniformly from {i : d_i <= c(t)},
                    c(t) = min(1, (t (1 - c0^p) / T + c0^p)^(1/p)); p = 1 linear, p = 2 "sqrt";
                    T = ``curriculum_fraction`` of the steps;
* ``pacing``        difficulty groups (``n_groups`` quantile bins) unlocked by a pacing function of t/T:
                    linear, quadratic, inverse_quadratic (1 - (1 - x)^2) or step (one more group per T/G);
* ``warmup``        curriculum as warm-up (Zhang et al. 2025): competence pacing over the first
                    ``curriculum_fraction`` of the steps, then uniform sampling from the rest;
* ``interleaved``   the pass split into ``cycles`` random parts, each sorted easy -> hard (a saw-tooth:
                    easy and hard examples alternate several times) [reconstruction: the paper's exact
                    interleaving is not given].

Paced strategies draw *without replacement* within a pass, so every strategy is a permutation of the data per
pass and all arms see the same examples equally often: only the order differs. When the unlocked pool has
fewer unused examples than a batch needs, the easiest unused examples fill it (this happens only when the
competence grows more slowly than the data is consumed, e.g. near the end of a linear schedule with T = the
pass: c(t) = c0 + t (1 - c0) / T falls below (t + 1) / T once t > T - 1 / c0).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

STRATEGIES = ("random", "easy_to_hard", "hard_to_easy", "competence", "pacing", "warmup", "interleaved")
PACINGS = ("linear", "quadratic", "inverse_quadratic", "step")


@dataclass
class OrderConfig:
    strategy: str = "random"
    c0: float = 0.01                  # competence: initial fraction unlocked (Platanios' usual value)
    root: float = 2.0                 # competence: p of the root-p schedule (1 = linear, 2 = sqrt)
    curriculum_fraction: float = 1.0  # T as a fraction of the run's steps (warmup: the warm-up's share)
    pacing: str = "linear"            # pacing: how the unlocked groups grow with t / T
    n_groups: int = 4                 # pacing: difficulty groups (quantile bins)
    cycles: int = 4                   # interleaved: easy -> hard saw-teeth per pass

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"order.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.pacing not in PACINGS:
            raise ValueError(f"order.pacing must be one of {', '.join(PACINGS)}, got {self.pacing!r}")
        if not 0.0 < self.c0 <= 1.0 or self.root <= 0:
            raise ValueError(f"order.c0 must be in (0, 1] and order.root > 0, got {self.c0}, {self.root}")
        if not 0.0 < self.curriculum_fraction <= 1.0:
            raise ValueError(f"order.curriculum_fraction must be in (0, 1], got {self.curriculum_fraction}")
        if self.n_groups < 1 or self.cycles < 1:
            raise ValueError("order.n_groups and order.cycles must be >= 1")


# ------------------------------------------------------------------------------------ difficulty
def difficulty_cdf(scores: Sequence[float], groups: Sequence | None = None) -> np.ndarray:
    """Empirical CDF of ``scores`` in [0, 1] (mid-ranks, so ties share a value), within each group if given.
    The easiest example of a group gets 0 when it is alone at the bottom, the hardest 1. NaN is an error:
    an example without a score has no place in a curriculum."""
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError(f"difficulty scores contain {int(np.isnan(s).sum())} NaN value(s)")
    from scipy.stats import rankdata

    out = np.zeros(len(s))
    labels = (np.zeros(len(s), dtype=np.int64) if groups is None
              else np.unique(np.asarray(groups), return_inverse=True)[1])
    for g in np.unique(labels):
        idx = np.flatnonzero(labels == g)
        if len(idx) == 1:
            continue
        out[idx] = (rankdata(s[idx], method="average") - 1) / (len(idx) - 1)
    return out


def competence(t: np.ndarray | float, T: float, c0: float = 0.01, p: float = 2.0) -> np.ndarray:
    """Platanios' root-p competence c(t) = min(1, (t (1 - c0^p) / T + c0^p)^(1/p))."""
    t = np.asarray(t, dtype=np.float64)
    return np.minimum(1.0, (t * (1 - c0 ** p) / T + c0 ** p) ** (1.0 / p))


def pacing_fraction(x: np.ndarray | float, kind: str, n_groups: int) -> np.ndarray:
    """Fraction of the difficulty groups unlocked at progress x = t / T in [0, 1] (at least one group)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    if kind == "linear":
        f = x
    elif kind == "quadratic":
        f = x ** 2
    elif kind == "inverse_quadratic":
        f = 1 - (1 - x) ** 2
    elif kind == "step":
        f = np.floor(x * n_groups) / n_groups
    else:
        raise ValueError(f"unknown pacing {kind!r}: expected one of {', '.join(PACINGS)}")
    return np.maximum(f, 1.0 / n_groups)


# ------------------------------------------------------------------------------------ orders
def _sorted_pass(d: np.ndarray, rng: np.random.Generator, descending: bool = False) -> np.ndarray:
    tie = rng.permutation(len(d))  # seeded tie-break: equal difficulties in random order
    key = -d if descending else d
    return np.lexsort((tie, key))


def _paced_pass(d: np.ndarray, rng: np.random.Generator, ceilings: np.ndarray, batch: int) -> np.ndarray:
    """One pass without replacement: batch k draws uniformly from the unused examples with d <= ceilings[k];
    when fewer remain unlocked, the easiest unused ones fill the batch."""
    n = len(d)
    by_difficulty = _sorted_pass(d, rng)          # easiest first, ties random
    rank = np.empty(n, dtype=np.int64)
    rank[by_difficulty] = np.arange(n)
    used = np.zeros(n, dtype=bool)
    out = np.empty(n, dtype=np.int64)
    pos = 0
    for c in ceilings:
        if pos >= n:
            break
        take = min(batch, n - pos)
        # unlocked = the first m examples by difficulty; m counts every example with d <= c
        m = int(np.searchsorted(d[by_difficulty], c, side="right"))
        pool = by_difficulty[:m][~used[by_difficulty[:m]]]
        if len(pool) >= take:
            pick = rng.choice(pool, size=take, replace=False)
        else:  # the unlocked pool is exhausted: complete the batch with the easiest unused examples
            rest = by_difficulty[~used[by_difficulty]]
            extra = rest[~np.isin(rest, pool)][: take - len(pool)]
            pick = np.concatenate([pool, extra])
            pick = pick[np.argsort(rank[pick], kind="stable")]
        used[pick] = True
        out[pos:pos + take] = pick
        pos += take
    if pos < n:  # more passes than ceilings given: the rest uniformly
        rest = np.flatnonzero(~used)
        out[pos:] = rng.permutation(rest)
    return out


def _ceilings(cfg: OrderConfig, d: np.ndarray, n_batches: int, total_batches: int, offset: int) -> np.ndarray:
    """Difficulty ceiling of every batch of one pass (batches offset .. offset + n_batches of the run)."""
    T = max(1.0, cfg.curriculum_fraction * total_batches)
    t = np.arange(offset, offset + n_batches, dtype=np.float64)
    if cfg.strategy in ("competence", "warmup"):
        return competence(t, T, cfg.c0, cfg.root)
    # pacing over groups: group g holds d in (g/G, (g+1)/G]; unlocking f of the groups = ceiling f
    return pacing_fraction(t / T, cfg.pacing, cfg.n_groups)


def make_order(difficulty: Sequence[float], n_samples: int, cfg: OrderConfig, seed: int,
               batch_size: int = 1) -> np.ndarray:
    """The ``n_samples`` example indices a run consumes, in order (passes over the data concatenated).

    ``difficulty``: per-example values in [0, 1] (``difficulty_cdf``); higher = harder. ``batch_size``:
    the *global* batch (per-process batch x processes): paced strategies unlock difficulty per step.
    """
    cfg.validate()
    d = np.asarray(difficulty, dtype=np.float64)
    n = len(d)
    if n == 0 or n_samples < 1:
        raise ValueError(f"make_order needs examples and n_samples >= 1, got {n} and {n_samples}")
    rng = np.random.default_rng(seed)
    passes = math.ceil(n_samples / n)
    total_batches = math.ceil(n_samples / batch_size)
    parts = []
    for k in range(passes):
        if cfg.strategy == "random":
            part = rng.permutation(n)
        elif cfg.strategy in ("easy_to_hard", "hard_to_easy"):
            part = _sorted_pass(d, rng, descending=cfg.strategy == "hard_to_easy")
        elif cfg.strategy == "interleaved":
            groups = rng.permutation(n) % cfg.cycles     # random, equal-sized parts
            part = np.concatenate([np.flatnonzero(groups == g)[_sorted_pass(d[groups == g], rng)]
                                   for g in range(cfg.cycles)])
        else:  # competence / warmup / pacing: the schedule runs over the whole run, not per pass
            n_batches = math.ceil(n / batch_size)
            offset = k * n_batches
            part = _paced_pass(d, rng, _ceilings(cfg, d, n_batches, total_batches, offset), batch_size)
        parts.append(part)
    return np.concatenate(parts)[:n_samples]


# ------------------------------------------------------------------------------------ sampler
class CurriculumSampler(torch.utils.data.Sampler):
    """Replays a precomputed order (``make_order``) from ``position``.

    ``common.train(..., sampler=CurriculumSampler(order))`` trains on exactly this order (one "epoch" of
    the loader = the whole order) and resumes at the checkpointed position. With a transformers
    ``Trainer``, return it from ``_get_train_sampler`` (see ``curriculum_trainer``); its resume skips the
    consumed batches, which lands on the same position because the order is fixed. ``state_dict`` /
    ``load_state_dict`` hold the position for loops that checkpoint samplers themselves.
    """

    def __init__(self, order: Sequence[int] | np.ndarray, position: int = 0) -> None:
        self.order = np.asarray(order, dtype=np.int64)
        self.position = int(position)

    def __len__(self) -> int:
        return len(self.order) - self.position

    def __iter__(self) -> Iterator[int]:
        start = self.position
        for i in range(start, len(self.order)):
            yield int(self.order[i])

    def set_epoch(self, epoch: int) -> None:
        """An order covers the whole run: a new loader epoch replays it from the start."""
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position, "length": len(self.order)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["length"]) != len(self.order):
            raise ValueError(f"sampler state is for an order of {state['length']} examples, this one has "
                             f"{len(self.order)}: same data, strategy and seed?")
        self.position = int(state["position"])


def curriculum_trainer(trainer_cls: type, order: Sequence[int] | np.ndarray) -> type:
    """A subclass of a transformers ``Trainer`` class that trains in ``order`` (one pass of it per epoch).
    Trainer shuffles with its own ``RandomSampler`` unless ``_get_train_sampler`` is overridden."""
    fixed = np.asarray(order, dtype=np.int64)

    class CurriculumTrainer(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):  # noqa: D401 - Trainer's hook
            return CurriculumSampler(fixed)

    CurriculumTrainer.__name__ = f"Curriculum{trainer_cls.__name__}"
    return CurriculumTrainer

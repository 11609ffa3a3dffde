"""The curriculum study's pieces against independent definitions: orders (common.curriculum), arms and
pools (exp_curriculum.arms), convergence metrics (exp_curriculum.convergence)."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

from common.curriculum import (
    STRATEGIES,
    CurriculumSampler,
    OrderConfig,
    competence,
    difficulty_cdf,
    make_order,
    pacing_fraction,
)
from exp_curriculum import arms, convergence
from exp_curriculum.study_data import chunk_stream, difficulty_scores

N, B = 400, 8


@pytest.fixture(scope="module")
def diff() -> np.ndarray:
    return difficulty_cdf(np.random.default_rng(0).normal(size=N))


def _profile(d: np.ndarray, order: np.ndarray, parts: int = 10) -> np.ndarray:
    return np.array([x.mean() for x in np.array_split(d[order], parts)])


# ------------------------------------------------------------------------------------------ orders
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_a_permutation_per_pass(diff, strategy):
    cfg = OrderConfig(strategy=strategy, curriculum_fraction=0.3 if strategy == "warmup" else 1.0)
    order = make_order(diff, 2 * N + 37, cfg, seed=1, batch_size=B)
    assert len(order) == 2 * N + 37
    for k in range(2):  # each full pass holds every example once
        assert sorted(order[k * N:(k + 1) * N].tolist()) == list(range(N))
    assert len(set(order[2 * N:].tolist())) == 37
    assert np.array_equal(order, make_order(diff, 2 * N + 37, cfg, seed=1, batch_size=B))   # deterministic
    if strategy != "easy_to_hard" and strategy != "hard_to_easy":
        assert not np.array_equal(order, make_order(diff, 2 * N + 37, cfg, seed=2, batch_size=B))


def test_sorted_orders_are_monotone_in_difficulty(diff):
    e2h = make_order(diff, N, OrderConfig(strategy="easy_to_hard"), seed=0)
    h2e = make_order(diff, N, OrderConfig(strategy="hard_to_easy"), seed=0)
    assert np.all(np.diff(diff[e2h]) >= 0) and np.all(np.diff(diff[h2e]) <= 0)


def test_random_order_has_a_flat_profile(diff):
    prof = np.stack([_profile(diff, make_order(diff, N, OrderConfig(), seed=s)) for s in range(20)]).mean(0)
    assert np.abs(prof - 0.5).max() < 0.05      # each tenth: mean CDF 0.5 (sd of one tenth's mean ~0.046/sqrt(20))


@pytest.mark.parametrize("root", [1.0, 2.0])
def test_competence_batches_stay_under_platanios_competence(diff, root):
    c0 = 0.05
    order = make_order(diff, N, OrderConfig(strategy="competence", c0=c0, root=root), seed=3, batch_size=B)
    T = N / B
    for k in range(N // B):
        # the paper's formula written out independently: c(t) = min(1, (t (1 - c0^p) / T + c0^p)^(1/p))
        c = min(1.0, (k * (1 - c0 ** root) / T + c0 ** root) ** (1 / root))
        batch, unused = diff[order[k * B:(k + 1) * B]], diff[order[k * B:]]
        if np.sum(unused <= c) >= B:
            assert batch.max() <= c + 1e-12, (k, c)
        else:  # the unlocked pool ran dry: the easiest unused examples complete the batch
            assert np.array_equal(np.sort(batch), np.sort(unused)[:B]), k
    prof = _profile(diff, order)
    assert prof[0] < 0.2 and np.all(np.diff(prof[:8]) > -0.02)       # easy first, rising
    assert math.isclose(float(competence(0, 10, 0.01, 2)), 0.01) and float(competence(10, 10, 0.01, 2)) == 1.0


def test_competence_with_a_short_curriculum_is_warmup_then_uniform(diff):
    cfg = OrderConfig(strategy="warmup", curriculum_fraction=0.25, c0=0.05)
    order = make_order(diff, N, cfg, seed=4, batch_size=B)
    warm = N // 4
    assert diff[order[:B]].max() <= 0.05 + 1e-12
    # after the warm-up every unused example is eligible: the rest is a uniform draw of the remaining ones
    rest = order[warm + B:]
    remaining = diff[order[warm + B:]]
    halves = np.array_split(rest, 2)
    assert abs(diff[halves[0]].mean() - diff[halves[1]].mean()) < 0.06
    assert abs(remaining.mean() - diff[rest].mean()) < 1e-12


@pytest.mark.parametrize("pacing", ["linear", "quadratic", "inverse_quadratic", "step"])
def test_pacing_unlocks_difficulty_groups(diff, pacing):
    G = 4
    order = make_order(diff, N, OrderConfig(strategy="pacing", pacing=pacing, n_groups=G), seed=5, batch_size=B)
    steps = N // B
    for k in range(steps):
        x = k / steps
        f = {"linear": x, "quadratic": x * x, "inverse_quadratic": 1 - (1 - x) ** 2,
             "step": math.floor(x * G) / G}[pacing]
        ceiling = max(f, 1 / G)
        batch = diff[order[k * B:(k + 1) * B]]
        # unless the unlocked pool ran dry (then the easiest unused fill in), a batch stays under the ceiling
        unused_under = np.sum(diff[order[k * B:]] <= ceiling)
        if unused_under >= B:
            assert batch.max() <= ceiling + 1e-12
    assert float(pacing_fraction(0.0, "step", 4)) == 0.25 and float(pacing_fraction(1.0, "quadratic", 4)) == 1.0


def test_interleaved_is_a_saw_tooth(diff):
    order = make_order(diff, N, OrderConfig(strategy="interleaved", cycles=4), seed=6)
    drops = np.flatnonzero(np.diff(diff[order]) < 0)
    assert len(drops) == 3                      # four sorted runs: three resets to easy
    for part in np.split(diff[order], drops + 1):
        assert len(part) == N // 4 and part[0] < 0.1 and part[-1] > 0.9


def test_difficulty_cdf_within_groups():
    s = np.array([5.0, 1.0, 3.0, 100.0, 200.0, 200.0, 300.0])
    g = np.array(["en", "en", "en", "fr", "fr", "fr", "fr"])
    d = difficulty_cdf(s, groups=g)
    assert d[:3].tolist() == [1.0, 0.0, 0.5]                  # per-language quantiles, not global ones
    assert np.allclose(d[3:], (rankdata(s[3:]) - 1) / 3) and d[4] == d[5]
    with pytest.raises(ValueError, match="NaN"):
        difficulty_cdf([1.0, float("nan")])


def test_bad_order_config_is_a_clear_error(diff):
    with pytest.raises(ValueError, match="order.strategy"):
        make_order(diff, 10, OrderConfig(strategy="hardest"), seed=0)
    with pytest.raises(ValueError, match="order.c0"):
        make_order(diff, 10, OrderConfig(strategy="competence", c0=0.0), seed=0)


# ------------------------------------------------------------------------------------------ sampler
def test_sampler_replays_from_its_position_and_checks_its_state():
    order = np.array([5, 3, 9, 1])
    s = CurriculumSampler(order)
    assert list(s) == [5, 3, 9, 1]
    s.load_state_dict({"position": 2, "length": 4})
    assert list(s) == [9, 1] and len(s) == 2
    with pytest.raises(ValueError, match="order of 7"):
        s.load_state_dict({"position": 0, "length": 7})


@pytest.mark.slow
def test_sampler_resumes_exactly_after_sigkill(tmp_path):
    """Kill a curriculum run mid-way; the rerun consumes exactly the rest of the order and ends with the
    weights of an uninterrupted run."""
    import json

    from tests.conftest import REPO, subprocess_env

    script = REPO / "tests" / "helpers" / "toy_curriculum.py"
    env = subprocess_env()
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(script), str(ref)], env=env, cwd=REPO, check=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "--sleep", "0.4"], env=env, cwd=REPO)
    deadline = time.time() + 240
    while time.time() < deadline:   # kill after step 7: checkpoints at 3 and 6, so steps 7+ are redone
        if (killed / "seen.txt").exists() and len((killed / "seen.txt").read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.json").exists(), "the run finished before SIGKILL: nothing was tested"
    subprocess.run([sys.executable, str(script), str(killed)], env=env, cwd=REPO, check=True, timeout=300)
    a, b = (json.loads((d / "final.json").read_text()) for d in (ref, killed))
    assert a["weights_sha256"] == b["weights_sha256"]
    steps: dict[int, list[int]] = {}
    for line in (killed / "seen.txt").read_text().splitlines():
        step, *idx = map(int, line.split())
        assert steps.setdefault(step, idx) == idx       # a step redone after the resume saw the same examples
    order = a["order"]
    assert [i for s in sorted(steps) for i in steps[s]] == order   # the whole order, in order, once
    ref_steps = [list(map(int, x.split()))[1:] for x in (ref / "seen.txt").read_text().splitlines()]
    assert [i for s in ref_steps for i in s] == order


def test_transformers_trainer_trains_in_the_curriculum_order(tmp_path):
    """A transformers Trainer given curriculum_trainer(Trainer, order) consumes the order."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from common.curriculum import curriculum_trainer

    order = np.array([7, 2, 5, 0, 1, 3, 6, 4])
    data = [{"input_ids": torch.full((6,), i + 1), "labels": torch.full((6,), i + 1)} for i in range(8)]
    seen: list[int] = []

    def collate(rows):
        seen.extend(int(r["input_ids"][0]) - 1 for r in rows)
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=6, n_embd=8, n_layer=1, n_head=1))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             dataloader_num_workers=0)
    curriculum_trainer(Trainer, order)(model=model, args=args, train_dataset=data, data_collator=collate).train()
    assert seen == order.tolist()


# ------------------------------------------------------------------------------------------ arms
def _table(n_en: int = 300, n_fr: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    t = pd.DataFrame({"language": ["en"] * n_en + ["fr"] * n_fr, "role": "candidate"})
    t.loc[:9, "role"] = "reference"
    for col in ("zstd_bits_per_byte", "mtld", "fre", "word1_bits_per_token"):
        t[col] = rng.normal(size=len(t))
    return t


def test_arm_strings_parse_and_bad_ones_name_the_entry():
    a = arms.parse_arm("competence:mtld:root=1,c0=0.1")
    assert a.kind == "order" and a.order.root == 1.0 and a.order.c0 == 0.1 and a.metric == "mtld"
    assert arms.parse_arm("mix:hard_fraction=0.75:metric=flesch").mix == {"hard_fraction": 0.75}
    assert arms.parse_arm("select:d4").selection == "d4" and arms.parse_arm("random").is_baseline
    for bad, msg in [("easy_to_hard", "needs a difficulty metric"), ("sideways:mtld", "unknown arm kind"),
                     ("select:best", "select:<"), ("mix:hard_fraction=0.5", "needs :metric"),
                     ("mix:en_fraction=2", r"in \[0, 1\]"), ("competence:mtld:speed=3", "key=value pairs")]:
        with pytest.raises(ValueError, match=msg):
            arms.parse_arm(bad)


def test_language_quota_temperature_sampling():
    q = arms.language_quota({"en": 900, "fr": 100}, 200, alpha=0.5)
    p_en = 900 ** 0.5 / (900 ** 0.5 + 100 ** 0.5)                 # p ∝ n^alpha, written out
    assert q["en"] + q["fr"] == 200 and abs(q["en"] - 200 * p_en) <= 0.5
    assert arms.language_quota({"en": 900, "fr": 100}, 200, alpha=1.0) == {"en": 180, "fr": 20}
    assert arms.language_quota({"en": 900, "fr": 100}, 200, alpha=0.0) == {"en": 100, "fr": 100}
    assert arms.language_quota({"en": 900, "fr": 100}, 100, en_fraction=0.25) == {"en": 25, "fr": 75}
    with pytest.raises(ValueError, match="more sequences than there are"):
        arms.language_quota({"en": 900, "fr": 100}, 300, en_fraction=0.5)


def test_pools_are_subsets_with_the_asked_composition():
    t = _table()
    base = arms.base_pool(t, 100, 0.5, seed=0)
    assert len(set(base)) == 100 and (t["role"].to_numpy()[base] == "candidate").all()
    assert (t["language"].to_numpy()[base] == "en").sum() == 50
    assert np.array_equal(base, arms.base_pool(t, 100, 0.5, seed=0))
    assert not np.array_equal(base, arms.base_pool(t, 100, 0.5, seed=1))
    hard = arms.mix_pool(t, arms.parse_arm("mix:hard_fraction=0.8:metric=compression"), 100, 0.5, seed=0)
    raw = difficulty_scores(t, "compression")
    for lg in ("en", "fr"):
        members = np.flatnonzero((t["language"] == lg).to_numpy() & (t["role"] == "candidate").to_numpy())
        median = np.median(raw[members])
        mine = hard[t["language"].to_numpy()[hard] == lg]
        assert len(mine) == 50 and (raw[mine] > median).sum() == 40


def test_selection_picks_the_top_scores_per_language():
    t = _table()
    cands = arms.selection_candidates(t, 100, 0.5, factor=2.0)
    assert len(cands) == 200
    rng = np.random.default_rng(2)
    scores = pd.DataFrame({"row": cands, "askllm": rng.random(200), "askllm_norm": rng.random(200),
                           "density": rng.random(200) + 0.1, "d4_rank": rng.permutation(200)})
    pick = arms.select_pool(t, cands, 100, 0.5, "askllm", scores, seed=0)
    for lg in ("en", "fr"):
        m = t["language"].to_numpy()[cands] == lg
        top = set(cands[m][np.argsort(-scores["askllm"].to_numpy()[m])[:50]])      # brute force
        assert set(pick[t["language"].to_numpy()[pick] == lg]) == top
    d4 = arms.select_pool(t, cands, 100, 0.5, "d4", scores, seed=0)
    assert set(d4) <= set(cands) and len(d4) == 100
    dens = arms.select_pool(t, cands, 100, 0.5, "density", scores, seed=0)
    assert len(set(dens)) == 100 and set(dens) <= set(cands)


def test_orders_of_an_arm_use_per_language_difficulty():
    t = _table()
    t.loc[t["language"] == "fr", "zstd_bits_per_byte"] += 100.0    # French far "harder" in raw units
    pool = arms.base_pool(t, 100, 0.5, seed=0)
    order = arms.arm_order(t, pool, arms.parse_arm("easy_to_hard:compression"), 100, seed=0, global_batch=10)
    langs = t["language"].to_numpy()[pool][order]
    assert set(langs[:20]) == {"en", "fr"}      # both languages start easy: quantiles are per language


# ------------------------------------------------------------------------------------------ data
def test_chunk_stream_cuts_fixed_length_rows():
    seqs, first = chunk_stream([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos=0)
    assert seqs.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]] and first.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------ convergence
def test_tokens_to_target_on_synthetic_curves():
    t = np.array([0, 10, 20, 30, 40.0])
    assert convergence.tokens_to_target(t, [5, 4, 3, 2, 1], 2.5) == 25.0        # linear crossing
    assert math.isnan(convergence.tokens_to_target(t, [5, 4, 3, 2, 1], 0.5))     # never reached
    assert convergence.tokens_to_target(t, [1, 4, 3, 2, 1], 3.0) == 0.0         # already there
    # exponential decay L = exp(-t/20), target exp(-1.5): the first crossing lies in (20, 40]
    tt = np.linspace(0, 100, 51)
    got = convergence.tokens_to_target(tt, np.exp(-tt / 20), math.exp(-1.5))
    assert abs(got - 30.0) < 0.1


def test_ema_and_auc_match_hand_computation():
    v = [4.0, 2.0, 3.0]
    s = convergence.ema(v, 0.5)
    assert s.tolist() == [4.0, 3.0, 3.0]                     # 0.5*4+0.5*2, 0.5*3+0.5*3
    assert convergence.area_under_curve([0, 1, 3], [2.0, 4.0, 0.0]) == pytest.approx((3 + 4) / 3)


def test_speedup_of_a_faster_curve():
    t = np.arange(0, 101, 10.0)
    base = 5 - 0.03 * t                    # reaches its final value 2.0 at t = 100
    fast = 5 - 0.04 * t                    # reaches 2.0 at t = 75
    m = convergence.curve_metrics(t, fast, t, base, smoothing=0.0)
    assert m["target"] == pytest.approx(2.0) and m["tokens_to_target"] == pytest.approx(75.0)
    assert m["speedup"] == pytest.approx(0.25) and m["baseline_tokens_to_target"] == pytest.approx(100.0)
    slow = convergence.curve_metrics(t, 5 - 0.02 * t, t, base, smoothing=0.0)
    assert math.isnan(slow["speedup"]) and slow["reached"] == 0.0


def test_paired_ci_against_scipy_t_interval():
    from scipy import stats

    d = [0.1, 0.3, 0.2, float("nan")]
    ci = convergence.paired_ci(d)
    lo, hi = stats.t.interval(0.95, 2, loc=0.2, scale=stats.sem([0.1, 0.3, 0.2]))
    assert ci["n"] == 3 and ci["n_missing"] == 1
    assert ci["t_low"] == pytest.approx(lo) and ci["t_high"] == pytest.approx(hi)
    assert 0.1 <= ci["boot_low"] <= ci["boot_high"] <= 0.3
    assert convergence.resolved({**ci, "n_missing": 0}) == "unresolved"   # t(2) = 4.30: the interval reaches 0
    assert convergence.resolved(convergence.paired_ci([0.19, 0.2, 0.21])) == "worse"
    assert convergence.resolved(convergence.paired_ci([-0.19, -0.2, -0.21])) == "better"
    # a seed that never reached the target: no verdict from the remaining (good) seeds
    assert convergence.resolved(convergence.paired_ci([-0.19, -0.2, float("nan")])) == "censored"

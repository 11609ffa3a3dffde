"""ASK-LLM's normalised score and the planted good/bad ranking check (issue 16, item 12)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from exp_curriculum.quality import normalised_yes, pairwise_accuracy, planted_documents

GOOD = [f"The river {w} flows through the old town, where the market has been held every week since the "
        f"twelfth century and merchants still sell {w} cloth." for w in ("Seine", "Loire", "Rhone", "Garonne",
                                                                          "Meuse", "Marne")]


def test_pairwise_accuracy_is_the_share_of_pairs_ranked_right():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(12), 1)          # rounded: ties happen
    labels = np.array([1] * 5 + [0] * 7)
    pairs = [(g, b) for g, b in itertools.product(scores[labels == 1], scores[labels == 0])]
    brute = np.mean([1.0 if g > b else 0.5 if g == b else 0.0 for g, b in pairs])
    assert pairwise_accuracy(scores, labels) == pytest.approx(brute)
    assert pairwise_accuracy([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0 and pairwise_accuracy([0.1, 0.9], [1, 0]) == 0.0
    with pytest.raises(ValueError):
        pairwise_accuracy([0.1, 0.2], [1, 1])


def test_planted_documents_cycle_through_the_bad_kinds():
    texts, labels = planted_documents(GOOD, seed=0)
    assert texts[: len(GOOD)] == GOOD and labels.tolist() == [1] * 6 + [0] * 6
    bad = texts[len(GOOD):]
    assert sorted(bad[0].split()) == sorted(GOOD[0].split()) and bad[0] != GOOD[0]   # word salad
    assert len(bad[1]) == len(GOOD[1]) and set(bad[1]) <= set("abcdefghijklmnopqrstuvwxyz ")  # letter noise
    assert len(set(bad[2].split())) <= 5                                             # one phrase repeated
    assert "<div" in bad[3] and len(bad[3]) == len(GOOD[3])                          # markup / script
    assert planted_documents(GOOD, seed=0) [0] == texts                              # deterministic


def test_normalised_yes_restricts_to_the_two_answers():
    out = normalised_yes(np.array([0.1, 0.0, 0.02]), np.array([0.3, 0.0, 0.02]))
    assert out.tolist() == pytest.approx([0.25, 0.5, 0.5])

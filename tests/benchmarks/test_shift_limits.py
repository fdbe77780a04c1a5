"""benchmarks/shift_limits.py: the ideal certificate, the rankings and the PPI multiplier of goal 2's analysis."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.shift_limits import (
    RANKINGS,
    ideal_coverage,
    limits_fold,
    median_case_passes,
    oracle_coverage,
    pool_limits,
    ppi_label_multiplier,
    rankings,
)
from pcee.calibration.scores import softmax
from pcee.policies.pcee import PCEEPolicy
from tests.synthetic import make_correlated_outputs


def test_median_case_needs_accuracy_above_alpha_by_more_with_fewer_labels():
    acc = np.array([0.9, 0.95, 1.0])
    assert not median_case_passes(acc, 150, 0.9, 0.1)[0]  # exactly α never certifies α
    assert median_case_passes(acc, 150, 0.9, 0.1)[1]
    assert not median_case_passes(acc, 20, 0.9, 0.1)[1]  # 19/20 right: its lower bound is under 0.9
    assert median_case_passes(acc, 30, 0.9, 0.1)[2]


def test_ideal_coverage_never_exceeds_the_oracle_and_grows_with_labels():
    rng = np.random.default_rng(0)
    scores = rng.random(4000)
    correct = rng.random(4000) < 0.4 + 0.6 * scores  # accuracy rises up the ranking
    oracle = oracle_coverage(scores, correct, 0.8)
    few, many = (ideal_coverage(scores, correct, 0.8, n, 0.1) for n in (50, 1000))
    assert 0.0 < few < many < oracle < 1.0
    assert ideal_coverage(scores, np.ones(4000, bool), 0.8, 50, 0.1) == 1.0
    assert ideal_coverage(scores, np.zeros(4000, bool), 0.8, 50, 0.1) == 0.0


def test_ppi_multiplier_is_one_for_a_useless_predictor_and_large_for_a_good_one():
    rng = np.random.default_rng(1)
    scores, correct = rng.random(3000), rng.random(3000) < 0.7
    noise = rng.random(3000)
    assert ppi_label_multiplier(scores, correct, noise, 1.0) == pytest.approx(1.0, abs=0.02)
    good = correct + 0.3 * noise
    assert ppi_label_multiplier(scores, correct, good, 1.0) > 3.0
    assert ppi_label_multiplier(scores, np.ones(3000, bool), noise, 1.0) is None  # r undefined


def test_rankings_keep_the_answer_and_read_later_exits():
    logits, labels, flops = make_correlated_outputs(3000, gaps=(0.0, 0.0, 0.0), seed=2)
    policy = PCEEPolicy(delta=0.9, min_count=5).fit(logits[:1500], labels[:1500], flops)
    scores, exits, pred = rankings(policy, logits[1500:])
    probs = softmax(logits[1500:])
    rows = np.arange(exits.size)
    assert set(scores) == set(RANKINGS)
    assert np.array_equal(pred, probs[rows, exits].argmax(-1))
    last = exits == logits.shape[1] - 1
    assert np.allclose(scores["final exit"][last], probs[rows, exits][last].max(-1))  # own confidence at the last exit
    early = exits < logits.shape[1] - 1
    assert early.any()
    assert np.allclose(scores["next exit"][early], probs[rows[early], exits[early] + 1, pred[early]])

    fold = limits_fold(
        policy, logits[1500:2200], labels[1500:2200], logits[2200:], labels[2200:], 0.8, 0.1, "clopper-pearson", 150
    )
    pooled = pool_limits([fold, fold])
    assert pooled["labels"] == 150 and pooled["oracle"] == pytest.approx(fold["oracle"])
    for name in RANKINGS:
        r = pooled["rankings"][name]
        assert 0.0 <= r["certified"] <= 1.0 and 0.0 <= r["ideal"] <= r["own_oracle"] <= 1.0, name

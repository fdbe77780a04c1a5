"""Few-label certification (pcee.few_labels): its miss rate over many label draws stays <= η, looks
upgrade the status as labels arrive, too few labels give a status and no rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pcee.few_labels import DEFAULT_BUDGET, certify_few_labels, certify_ordering, schedule

ALPHA, ETA = 0.9, 0.1
# a population of requests: 15 score levels (a map's bins), each with its own accuracy. Accuracy on
# answered falls through α as ρ falls, slowly, so many thresholds sit close to α: the hard case.
LEVELS = np.linspace(0.70, 0.99, 15)
ACCURACY = np.clip(0.72 + 0.28 * (LEVELS - 0.70) / 0.29, 0.0, 1.0)
SHARE = np.full(15, 1.0 / 15)


def _answered_accuracy(rho: float) -> float:
    """The population's accuracy on answered requests at ρ (exact, from the levels)."""
    on = LEVELS >= rho - 1e-12
    return float((SHARE[on] * ACCURACY[on]).sum() / SHARE[on].sum())


def _draw(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    level = rng.choice(15, size=n, p=SHARE)
    return LEVELS[level], rng.random(n) < ACCURACY[level]


def test_miss_rate_over_draws_stays_within_eta():
    rng = np.random.default_rng(0)
    draws, misses, certified, naive_misses = 300, 0, 0, 0
    for _ in range(draws):
        scores, correct = _draw(DEFAULT_BUDGET, rng)
        result = certify_few_labels(scores, correct, ALPHA, ETA)
        if result.rule is not None:
            certified += 1
            misses += _answered_accuracy(result.rule.threshold) < ALPHA
        # the point estimate on the same labels (what an uncertified rule would serve) misses often
        on = [s for s in np.unique(scores) if correct[scores >= s].mean() >= ALPHA]
        naive_misses += bool(on) and _answered_accuracy(min(on)) < ALPHA
    sigma = math.sqrt(ETA * (1 - ETA) / draws)
    assert certified > draws // 4  # the test is not vacuous: many draws certify a rule
    assert misses / draws <= ETA + 3 * sigma, (
        f"miss rate {misses / draws:.3f} over {draws} draws ({certified} certified)"
    )
    assert naive_misses / draws > ETA + 3 * sigma  # and a rule without the bound would fail this test


def test_labels_arriving_in_pieces_move_the_status_to_certified():
    rng = np.random.default_rng(1)
    scores, correct = _draw(DEFAULT_BUDGET, rng)
    first, *_ = schedule()
    seen = []
    for n in range(25, DEFAULT_BUDGET + 1, 25):
        result = certify_few_labels(scores[:n], correct[:n], ALPHA, ETA)
        seen.append(result.status)
        if n < first[0]:
            assert result.status == "waiting_for_labels" and result.rule is None and not result.looks
            assert result.labels_line == f"waiting for labels ({n}/{DEFAULT_BUDGET})"
    assert seen[-1] == "certified" and "certified" in result.reason
    assert sum(share for _, share in schedule()) == pytest.approx(1.0)
    assert [look.risk for look in result.looks] == pytest.approx([ETA * share for _, share in schedule()])


def test_a_look_reads_only_its_first_labels_and_a_later_label_changes_nothing_before_it():
    rng = np.random.default_rng(2)
    scores, correct = _draw(DEFAULT_BUDGET, rng)
    a = certify_few_labels(scores[:120], correct[:120], ALPHA, ETA)
    flipped = correct.copy()
    flipped[110:] = ~flipped[110:]
    b = certify_few_labels(scores[:120], flipped[:120], ALPHA, ETA)
    assert [look.rule for look in a.looks] == [look.rule for look in b.looks]


def test_too_few_rows_and_bad_input():
    rule = certify_ordering(np.full(10, 0.99), np.ones(10, bool), ALPHA, ETA)
    assert rule.kind == "not_certified"  # 10 rows cannot certify 0.9 even with no error
    with pytest.raises(ValueError, match="one entry per labelled row"):
        certify_few_labels(np.ones(5), np.ones(4, bool), ALPHA, ETA)
    with pytest.raises(ValueError, match="budget"):
        schedule(0)
    assert schedule(300)[-1][0] == 300 and schedule(50)[0][0] < 50

"""No silent break (pcee.label_free_bound): a shift that keeps confidences high while accuracy drops
(ATC's failure mode) is declined as "unverified under drift", never answered below α.

The shift keeps every exit's confidence law and garbles the exits' errors (they stop agreeing): what
the label-free bound reads. A shift that changes nothing observable (same confidences, the exits
erring together) cannot be seen without labels; no test here pretends otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from pcee.label_free import ATCEstimator
from pcee.label_free_bound import (
    MarginCalibration,
    ShiftEstimators,
    calibrate_margin,
    lower_bound_rule,
    worst_overestimate,
)
from pcee.policies.pcee import PCEEPolicy
from pcee.selective import decisions, estimate_answer_threshold, expected_at_exit
from tests.synthetic import make_correlated_outputs as make_outputs

ALPHA = 0.85


def _served_accuracy(policy, logits, labels, answered):
    exits, _ = expected_at_exit(policy, logits)
    correct = logits[np.arange(exits.size), exits].argmax(-1) == labels
    return float(correct[answered].mean()) if answered.any() else None


@pytest.fixture(scope="module")
def fitted():
    """Maps and estimators on calibrated validation rows; the margin from mild synthetic shifts."""
    logits, labels, flops = make_outputs(3000, seed=1)
    policy = PCEEPolicy(delta=ALPHA, min_count=5).fit(logits[:1500], labels[:1500], flops)
    est = ShiftEstimators.fit(logits[:1500], labels[:1500])
    shifts = [
        (family, f"{family}/{i}", *make_outputs(1500, gaps=gaps, seed=10 + i)[:2])
        for i, (family, gaps) in enumerate(
            [("mild", (0.02, 0.02, 0.02)), ("mild", (0.05, 0.03, 0.02)), ("early", (0.1, 0.05, 0.0))]
        )
    ]
    return policy, est, calibrate_margin(est, policy, iter(shifts))


def test_confident_but_wrong_traffic_is_declined_not_answered(fitted):
    policy, est, calibration = fitted
    # the shift: every exit's confidence keeps its validation law, accuracy drops by 30 points
    logits, labels, _ = make_outputs(2000, gaps=(0.3, 0.3, 0.3), seed=99, shared_confusion=False)
    shadow, live = slice(0, 500), slice(500, None)
    exits, expected = expected_at_exit(policy, logits[live])
    served_acc = _served_accuracy(policy, logits[live], labels[live], np.ones(exits.size, bool))
    assert served_acc < ALPHA - 0.1  # the traffic really misses α ...
    atc = ATCEstimator().fit(*make_outputs(1500, seed=1)[:2])
    assert atc.estimate(logits[shadow])[-1] > ALPHA  # ... while ATC says it does not (its failure mode)
    # the old label-free point estimate would have answered most of it, below α
    old = estimate_answer_threshold(expected, ALPHA)
    old_answered = old.answered(expected)
    assert (
        old_answered.mean() > 0.5 and _served_accuracy(policy, logits[live], labels[live], old_answered) < ALPHA - 0.05
    )

    rule = lower_bound_rule(est, policy, logits[shadow], ALPHA, calibration.margin())
    answered = decisions(expected, rule.serving_threshold, "abstain") == "answered"
    acc = _served_accuracy(policy, logits[live], labels[live], answered)
    assert acc is None or acc >= ALPHA - 0.01, f"{rule.kind}: answered {answered.mean():.3f} at accuracy {acc}"
    assert rule.kind == "unverified" and not answered.any()
    assert "unverified under drift" in rule.guarantee


def test_calibrated_traffic_is_answered_with_a_lower_bound(fitted):
    policy, est, calibration = fitted
    logits, labels, _ = make_outputs(2000, seed=5)  # no shift: the estimators are right
    rule = lower_bound_rule(est, policy, logits[:500], ALPHA, calibration.margin())
    assert rule.kind == "lower_bound" and rule.coverage > 0.3
    assert rule.accuracy_lower_bound is not None and rule.accuracy_lower_bound >= ALPHA
    _, expected = expected_at_exit(policy, logits[500:])
    acc = _served_accuracy(policy, logits[500:], labels[500:], rule.answered(expected))
    assert acc is not None and acc >= ALPHA - 0.01


def test_margin_is_the_worst_family_and_leaves_one_out(fitted):
    policy, est, calibration = fitted
    assert set(calibration.errors) == {"mild", "early"}
    worst = {f: calibration.family_margin(f) for f in calibration.errors}
    assert calibration.margin() == pytest.approx(max(0.0, *worst.values()))
    assert calibration.margin(leave_out="early") == pytest.approx(max(0.0, worst["mild"]))
    again = MarginCalibration.from_dict(calibration.to_dict())
    assert again.margin() == pytest.approx(calibration.margin())
    # the worst error of a shift is measured, not assumed: a harder shift over-estimates more
    hard = make_outputs(1500, gaps=(0.2, 0.2, 0.2), seed=3)
    assert worst_overestimate(est, policy, hard[0], hard[1]) > calibration.margin()
    restored = ShiftEstimators.from_dict(est.to_dict())
    assert restored.final_estimates(hard[0]) == pytest.approx(est.final_estimates(hard[0]))

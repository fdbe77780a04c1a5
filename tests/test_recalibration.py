"""Online recalibration on synthetic shifted outputs: static maps fall short, refit maps do not."""

from __future__ import annotations

import numpy as np
import pytest

from pcee.policies.pcee import PCEEPolicy
from pcee.policies.pcee_ws import PCEEWSPolicy
from pcee.recalibration import control_at_delta, recalibrate, recent_weight, refit_map
from tests.synthetic import make_outputs

DELTA = 0.85
SHIFT = (0.3, 0.2, 0.0)  # early exits become over-confident; the final exit keeps its accuracy


@pytest.fixture(scope="module")
def fitted():
    val_logits, val_labels, flops = make_outputs(2000, seed=0)
    return PCEEPolicy(delta=DELTA).fit(val_logits, val_labels, flops), flops


@pytest.mark.parametrize("policy_cls", [PCEEPolicy, PCEEWSPolicy])
def test_static_map_falls_short_under_shift_and_recalibrated_map_does_not(policy_cls):
    val_logits, val_labels, flops = make_outputs(2000, seed=0)
    policy = policy_cls(delta=DELTA).fit(val_logits, val_labels, flops)
    shifted_logits, shifted_labels, _ = make_outputs(4000, gaps=SHIFT, seed=2)
    _, static_shortfall, _ = control_at_delta(policy, shifted_logits, shifted_labels, DELTA)
    assert static_shortfall > 0.05  # the static map badly misses δ under the shift

    recent_logits, recent_labels, _ = make_outputs(500, gaps=SHIFT, seed=3)
    result = recalibrate(policy, recent_logits, recent_labels, flops=flops, seed=0)
    assert result.status == "improved", result.reason
    assert result.new_shortfall < result.old_shortfall
    _, new_shortfall, new_cost = control_at_delta(result.policy, shifted_logits, shifted_labels, DELTA, flops)
    assert new_shortfall <= 0.01  # ≤ 1 point on fresh shifted rows with 500 labels
    assert new_cost > result.old_relative_cost  # control is bought with later exits, not luck


def test_served_policy_is_not_modified(fitted):
    policy, flops = fitted
    before = policy.to_dict()
    recent_logits, recent_labels, _ = make_outputs(400, gaps=SHIFT, seed=4)
    result = recalibrate(policy, recent_logits, recent_labels, flops=flops)
    assert result.policy is not policy
    assert policy.to_dict() == before
    assert result.policy.to_dict()["state"]["maps"] != before["state"]["maps"]


def test_too_few_labels_changes_nothing(fitted):
    policy, flops = fitted
    recent_logits, recent_labels, _ = make_outputs(40, gaps=SHIFT, seed=5)
    result = recalibrate(policy, recent_logits, recent_labels, flops=flops, min_labels=100)
    assert result.status == "too_few_labels"
    assert not result.improved
    assert result.policy is None
    assert "40 labelled rows" in result.reason and "100" in result.reason


def test_clean_recent_data_is_not_an_improvement(fitted):
    policy, flops = fitted
    clean_logits, clean_labels, _ = make_outputs(500, seed=6)
    result = recalibrate(policy, clean_logits, clean_labels, flops=flops)
    assert result.old_shortfall == 0.0
    assert result.status == "not_improved"


def test_weight_rule_and_effective_counts(fitted):
    policy, _ = fitted
    assert recent_weight(2000, 400, recent_share=0.8) == pytest.approx(20.0)  # 4 × 2000 / 400
    assert recent_weight(100, 1000) == 1.0  # never below one validation row
    with pytest.raises(ValueError, match="recent_share"):
        recent_weight(100, 10, recent_share=1.0)
    old = policy.maps_.maps_[0]
    scores = np.array([0.95, 0.96, 0.97])  # three recent rows in one bin, all wrong
    new = refit_map(old, scores, np.zeros(3), weight=50.0)
    b = old.bin_index(np.array([0.95]))[0]
    assert new.counts_[b] == pytest.approx(old.counts_[b] + 3)  # samples, not weights
    expected = old.counts_[b] * old.raw_acc_[b] / (old.counts_[b] + 150.0)
    assert new.raw_acc_[b] == pytest.approx(expected)
    untouched = np.setdiff1d(np.arange(len(old.counts_)), [b])
    np.testing.assert_allclose(new.acc_[untouched], old.acc_[untouched])


def test_bad_inputs_name_the_problem(fitted):
    policy, _ = fitted
    logits, labels, _ = make_outputs(200, seed=7)
    with pytest.raises(ValueError, match="logits must be"):
        recalibrate(policy, logits[:, 0], labels)
    with pytest.raises(ValueError, match="exits"):
        recalibrate(policy, logits[:, :2], labels)
    with pytest.raises(ValueError, match="holdout_fraction"):
        recalibrate(policy, logits, labels, holdout_fraction=1.5)
    from pcee.policies.threshold import ThresholdPolicy

    thr = ThresholdPolicy().fit(logits, labels, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="PCEE-type"):
        recalibrate(thr, logits, labels)

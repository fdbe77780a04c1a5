"""Label-free recalibration (pcee.label_free): ATC, the logit-shift level, the refit and its agreement gate."""

from __future__ import annotations

import numpy as np
import pytest

from pcee.label_free import ATCEstimator, calibrate_level, label_free_refit
from pcee.policies.pcee import PCEEPolicy
from pcee.selective import AnswerRule
from tests.synthetic import make_outputs


def _accuracy(logits, labels):
    return (logits.argmax(-1) == labels[:, None]).mean(axis=0)


def _mix(n: int, easy_share: float, seed: int):
    """Easy (confident, calibrated) and hard (less confident, calibrated) rows in a given mixture."""
    easy = make_outputs(n, seed=seed)
    hard = make_outputs(n, shapes=((2.0, 2.0), (3.0, 2.0), (4.0, 2.0)), seed=seed + 100)
    k = int(easy_share * n)
    return np.concatenate([easy[0][:k], hard[0][: n - k]]), np.concatenate([easy[1][:k], hard[1][: n - k]])


def test_atc_moves_with_the_accuracy_of_a_shifted_mixture():
    val_logits, val_labels = _mix(4000, 0.5, seed=0)
    atc = ATCEstimator(score="max_prob").fit(val_logits, val_labels)
    val_acc = _accuracy(val_logits, val_labels)
    assert np.allclose(atc.estimate(val_logits), val_acc, atol=0.01)  # by construction on its own rows
    hard_logits, hard_labels = _mix(4000, 0.2, seed=7)  # more hard rows: lower accuracy, no labels used to estimate it
    easy_logits, easy_labels = _mix(4000, 0.8, seed=8)
    est_hard, est_easy = atc.estimate(hard_logits), atc.estimate(easy_logits)
    assert (_accuracy(hard_logits, hard_labels) < val_acc).all() and (est_hard < val_acc).all()
    assert (_accuracy(easy_logits, easy_labels) > val_acc).all() and (est_easy > val_acc).all()
    assert (np.abs(est_hard - _accuracy(hard_logits, hard_labels)) < 0.1).all()
    est = est_hard
    # scores with NaN where an exit was not computed (what the service logs)
    from pcee.calibration.scores import confidence

    s = confidence(hard_logits, "max_prob")
    s[: len(s) // 2, 1:] = np.nan
    part = atc.estimate_from_scores(s)
    assert np.isfinite(part).all() and abs(part[0] - est[0]) < 1e-9
    again = ATCEstimator.from_dict(atc.to_dict())
    assert np.array_equal(again.estimate(hard_logits), est)
    with pytest.raises(ValueError, match="not fitted"):
        ATCEstimator().estimate(hard_logits)


def test_calibrate_level_matches_the_target_mean_and_keeps_the_order():
    v = np.random.default_rng(0).uniform(0.2, 1.0, 1000)
    out = calibrate_level(v, 0.5)
    assert out.mean() == pytest.approx(0.5, abs=1e-6)
    assert np.array_equal(np.argsort(out, kind="stable"), np.argsort(v, kind="stable"))
    assert ((out >= 0) & (out <= 1)).all()


def _setup(old_delta: float):
    val_logits, val_labels, flops = make_outputs(3000, seed=2)
    policy = PCEEPolicy(delta=old_delta).fit(val_logits, val_labels, flops)
    atc = ATCEstimator().fit(val_logits, val_labels)
    return policy, atc, flops


def test_refit_on_a_stream_where_exit_0_drifts_raises_agreement_and_is_accepted():
    policy, atc, flops = _setup(old_delta=0.8)
    # recent traffic: exit 0 is much less often right (it agrees less with the final exit); no labels are passed
    recent, recent_labels, _ = make_outputs(1500, gaps=(0.35, 0.0, 0.0), seed=3)
    before = policy.to_dict()
    result = label_free_refit(policy, recent, atc, target_accuracy=0.8, flops=flops, seed=0)
    assert policy.to_dict() == before  # the served policy is never modified
    assert result.status == "label_free" and result.accepted, result.reason
    assert result.new_agreement >= result.old_agreement
    assert result.new_threshold == 0.8 and result.policy.served_threshold() == 0.8
    assert result.answer_rule.kind == "estimated" and "no labels" in result.answer_rule.guarantee
    # exit 0's refit map trusts it less, so fewer requests leave there
    exits_old, exits_new = policy.decide(recent), result.policy.decide(recent)
    assert (exits_new == 0).mean() < (exits_old == 0).mean()
    # and the answered requests are more often right (a check with the labels the refit never saw)
    rows = np.arange(len(recent_labels))
    acc_old = (recent[rows, exits_old].argmax(-1) == recent_labels).mean()
    acc_new = (recent[rows, exits_new].argmax(-1) == recent_labels).mean()
    assert acc_new > acc_old
    d = result.to_dict()
    assert d["answer_rule"]["kind"] == "estimated" and "policy" not in d


def test_refit_that_would_lower_held_out_agreement_is_refused():
    # the served policy sends everyone to the final exit (δ = 1): its answers agree with the final exit always;
    # a refit at α = 0.6 would answer early and disagree on some rows, so it is refused
    policy, atc, flops = _setup(old_delta=1.0)
    recent, _, _ = make_outputs(1000, seed=4)
    result = label_free_refit(policy, recent, atc, target_accuracy=0.6, flops=flops)
    assert result.status == "refused" and not result.accepted
    assert result.old_agreement == 1.0 and result.new_agreement < 1.0
    assert "refused" in result.reason


def test_too_few_rows_and_unsupported_policy():
    policy, atc, flops = _setup(old_delta=0.8)
    recent, _, _ = make_outputs(20, seed=5)
    res = label_free_refit(policy, recent, atc, target_accuracy=0.8, min_rows=50)
    assert res.status == "too_few_rows" and res.policy is None
    from pcee.policies.registry import build_policy

    val_logits, val_labels, _ = make_outputs(3000, seed=2)
    rc = build_policy("risk-controlled", alpha=0.8).fit(val_logits, val_labels, flops)
    with pytest.raises(ValueError, match="chooses its threshold with labels"):
        label_free_refit(rc, recent, atc, target_accuracy=0.8)
    with pytest.raises(ValueError, match="target"):
        label_free_refit(policy, recent, atc, target_accuracy=1.5)
    assert AnswerRule.from_dict(None).threshold == 0.0

"""Selective answering (pcee.selective): ρ's certificate, the label-free estimate, decisions, summaries."""

from __future__ import annotations

import numpy as np
import pytest

from pcee.selective import (
    ANSWER_MODES,
    NO_RULE,
    AnswerRule,
    answered_mask,
    check_answer_mode,
    choose_answer_threshold,
    decisions,
    estimate_answer_threshold,
    summarize,
)


def population(n: int, seed: int, lo: float = 0.3):
    """Expected accuracy e ~ U(lo, 1) on a 0.05 grid (map values are bin values), correct ~ Bernoulli(e)."""
    rng = np.random.default_rng(seed)
    e = np.round(rng.uniform(lo, 1.0, n) * 20) / 20
    return e, rng.random(n) < e


def test_certified_rho_keeps_answered_accuracy_above_target_on_fresh_draws():
    alpha, eta = 0.85, 0.1
    misses, coverages = 0, []
    fresh_e, fresh_c = population(200_000, seed=999)
    for seed in range(20):
        e, c = population(1000, seed)
        rule = choose_answer_threshold(e, c, alpha, risk=eta)
        assert rule.kind == "certified" and rule.certified
        assert 0.0 < rule.threshold < 1.0  # the mean accuracy (0.65) is below α: some requests must be declined
        assert rule.accuracy_lower_bound >= alpha - 1e-12 and rule.answered_accuracy >= rule.accuracy_lower_bound
        ans = rule.answered(fresh_e)
        misses += fresh_c[ans].mean() < alpha
        coverages.append(ans.mean())
    assert misses <= 5  # P(miss) <= η = 0.1 per draw; 20 draws: <= 5 misses except with probability < 1%
    assert min(coverages) > 0.1 and np.median(coverages) > 0.2  # not trivially conservative (oracle coverage ≈ 0.43)


def test_rho_is_zero_where_all_traffic_meets_the_target():
    e, c = population(2000, seed=1, lo=0.9)  # accuracy ≈ 0.95
    rule = choose_answer_threshold(e, c, 0.8, risk=0.1)
    assert rule.certified and rule.threshold == 0.0 and rule.coverage == 1.0
    assert answered_mask(e, rule.threshold).all()


def test_unreachable_target_is_not_certified_and_says_so():
    e, c = population(300, seed=2)
    rule = choose_answer_threshold(e, c, 0.999, risk=0.1)
    assert rule.kind == "not_certified" and not rule.certified
    assert "NOT certified" in rule.guarantee


def test_too_few_answered_rows_are_skipped_not_failed():
    # 10 rows at map value 1.0 with two errors would fail the sequence at its top if they were tested
    e = np.r_[np.ones(10), np.full(990, 0.9)]
    c = np.r_[np.array([False, False] + [True] * 8), np.random.default_rng(3).random(990) < 0.95]
    rule = choose_answer_threshold(e, c, 0.85, risk=0.1)
    assert rule.certified and rule.threshold <= 0.9 and rule.coverage > 0.9


def test_label_free_estimate_meets_target_in_expectation():
    e, c = population(5000, seed=4)
    rule = estimate_answer_threshold(e, 0.85)
    assert rule.kind == "estimated" and not rule.certified and "no guarantee" in rule.guarantee
    ans = rule.answered(e)
    assert rule.answered_accuracy == pytest.approx(e[ans].mean())
    assert abs(c[ans].mean() - 0.85) < 0.03  # calibrated expected accuracies: the estimate is close to the truth
    assert estimate_answer_threshold(e, 0.5).threshold == 0.0  # mean accuracy 0.65 >= 0.5: nothing declined


def test_decisions_by_mode():
    e = np.array([0.95, 0.5, np.nan])
    assert decisions(e, 0.9, "abstain").tolist() == ["answered", "abstained", "abstained"]
    assert decisions(e, 0.9, "defer").tolist() == ["answered", "deferred", "deferred"]
    assert decisions(e, 0.9, "answer").tolist() == ["answered"] * 3  # ρ reported, not applied
    assert decisions(e, 0.0, "abstain").tolist() == ["answered"] * 3
    with pytest.raises(ValueError, match="unknown answer mode 'maybe'"):
        check_answer_mode("maybe")
    assert set(ANSWER_MODES) == {"answer", "abstain", "defer"}


def test_rule_round_trip_and_bad_threshold():
    rule = AnswerRule(
        threshold=0.7,
        kind="certified",
        target_accuracy=0.9,
        risk=0.1,
        bound="clopper-pearson",
        n=500,
        coverage=0.8,
        answered_accuracy=0.93,
        accuracy_lower_bound=0.91,
    )
    d = rule.to_dict()
    assert d["certified"] is True and AnswerRule.from_dict(d) == rule
    assert AnswerRule.from_dict(None) == NO_RULE and NO_RULE.threshold == 0.0
    with pytest.raises(ValueError, match=r"ρ must be in \[0, 1\]"):
        AnswerRule.from_dict({"threshold": 1.5, "kind": "point"})


def test_summary_measures_only_labelled_answered_rows():
    d = np.array(["answered", "answered", "answered", "abstained", "deferred", "deferral_failed"], dtype=object)
    e = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.3])
    correct = np.array([1.0, 0.0, np.nan, 1.0, 1.0, np.nan])
    s = summarize(d, e, correct)
    assert (s.n, s.answered, s.abstained, s.deferred, s.deferral_failed) == (6, 3, 1, 1, 1)
    assert s.coverage == pytest.approx(0.5)
    assert s.answered_accuracy_estimated == pytest.approx(0.8)
    assert s.n_labelled_answered == 2 and s.answered_accuracy_measured == pytest.approx(0.5)
    assert summarize(d, e).answered_accuracy_measured is None
    with pytest.raises(ValueError, match="unknown decisions"):
        summarize(np.array(["maybe"], dtype=object), np.array([0.5]))


def test_operating_point_carries_its_answer_rule():
    from pcee.operating_point import choose_operating_point
    from pcee.outputs import ExitOutputs
    from tests.synthetic import make_outputs

    logits, labels, flops = make_outputs(2000, seed=5)
    val = ExitOutputs(logits, labels, flops)
    op = choose_operating_point("pcee", val, target_accuracy=0.8, risk=0.1)
    assert op.certified and op.answer_rule["kind"] == "certified" and op.answer_rule["threshold"] == 0.0
    assert op.tags()["op.answer_threshold"] == "0" and "answer threshold ρ" in op.markdown()
    # an uncertifiable target: the exit rule is not certified, the answer rule is chosen at the most conservative point
    hard = choose_operating_point("pcee", val, target_accuracy=0.95, risk=0.1)
    assert not hard.certified
    assert hard.answer_rule["kind"] in ("certified", "not_certified") and hard.answer_rule["threshold"] > 0.0
    point = choose_operating_point("pcee", val, target_accuracy=0.8, mode="point")
    assert point.answer_rule["kind"] == "point"

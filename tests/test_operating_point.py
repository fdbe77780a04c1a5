"""The operating-point pipeline: data roles, the certificate's miss rate, modes and bad input."""

import warnings

import numpy as np
import pytest

from pcee.calibration.bounds import loss_upper_bound
from pcee.operating_point import (
    NoCertifiablePointError,
    best_possible_accuracy,
    check_calibration_size,
    choose_operating_point,
    split_fit_calibrate,
)
from pcee.outputs import ExitOutputs
from tests.population import Population
from tests.synthetic import make_graded_outputs


def outputs(n, seed):
    logits, labels, flops = make_graded_outputs(n=n, seed=seed)
    return ExitOutputs(logits, labels, flops)


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    fit, cal = split_fit_calibrate(labels, 0.5, seed=3)
    assert np.intersect1d(fit, cal).size == 0 and fit.size + cal.size == labels.size
    np.testing.assert_array_equal(np.bincount(labels[cal]), [5, 10, 15, 20])
    fit2, cal2 = split_fit_calibrate(labels, 0.5, seed=3)
    np.testing.assert_array_equal(cal, cal2)
    assert not np.array_equal(np.sort(cal), cal)  # a seeded order, not the rows' order (WSR reads a sequence)


@pytest.mark.parametrize("policy", ["pcee", "pcee-ws", "threshold", "msdnet-budget", "risk-controlled"])
def test_test_labels_cannot_change_the_choice(policy):
    val, test = outputs(1500, 0), outputs(800, 1)
    scrambled = ExitOutputs(test.logits, np.random.default_rng(0).permutation(test.labels), test.flops)
    a = choose_operating_point(policy, val, target_accuracy=0.85, test=test)
    b = choose_operating_point(policy, val, target_accuracy=0.85, test=scrambled)
    c = choose_operating_point(policy, val, target_accuracy=0.85)
    assert a.value == b.value == c.value and a.served_threshold == b.served_threshold == c.served_threshold
    assert a.sweep == b.sweep == c.sweep and a.policy.to_dict() == b.policy.to_dict()
    assert a.test_accuracy != b.test_accuracy and c.test_accuracy is None  # the check did see the labels


@pytest.mark.parametrize("bound", ["clopper-pearson", "hoeffding-bentkus", "wsr"])
def test_certificate_miss_rate_over_200_draws(bound):
    """P(population accuracy < α) <= η over calibration draws, for each bound; point mode misses more."""
    pop = Population(m=6000, seed=5)
    alpha, eta, draws = 0.8, 0.1, 200
    misses, point_misses, uncertified, costs = 0, 0, 0, []
    for d in range(draws):
        rng = np.random.default_rng(d)
        logits, labels = pop.draw(1000, rng)
        val = ExitOutputs(logits.astype(np.float32), labels, pop.flops)
        op = choose_operating_point("pcee", val, target_accuracy=alpha, risk=eta, bound=bound, seed=d)
        acc, cost = pop.policy_accuracy(op.policy)
        if not op.certified:
            uncertified += 1
        misses += acc < alpha
        costs.append(cost)
        if bound == "clopper-pearson":
            pt = choose_operating_point("pcee", val, target_accuracy=alpha, mode="point", seed=d)
            point_misses += pop.policy_accuracy(pt.policy)[0] < alpha
    slack = 3 * np.sqrt(eta * (1 - eta) / draws)
    assert misses / draws <= eta + slack
    assert uncertified < draws / 10 and np.median(costs) < 0.9  # certified points still exit early
    if bound == "clopper-pearson":
        assert point_misses / draws > eta  # the test has teeth: without a bound the target is missed often


def test_modes_and_their_labels():
    val, test = outputs(2000, 2), outputs(800, 3)
    cert = choose_operating_point("pcee", val, target_accuracy=0.85, test=test)
    assert cert.certified and cert.accuracy_lower_bound >= 0.85 and "probability >= 0.90" in cert.guarantee
    passed = [r for r in cert.sweep if r["passed"]]
    assert passed and all(r["accuracy_lower_bound"] >= 0.85 for r in passed)
    assert cert.sweep[0]["value"] == max(r["value"] for r in cert.sweep)  # the fixed sequence starts most conservative
    point = choose_operating_point("pcee", val, target_accuracy=0.85, mode="point")
    assert not point.certified and "no guarantee" in point.guarantee and "no guarantee" in point.markdown()
    assert point.relative_cost <= cert.relative_cost + 1e-12 and point.calibrate_accuracy >= 0.85
    budget = choose_operating_point("pcee", val, flops_budget=0.6, mode="budget", bound="hoeffding-bentkus")
    assert budget.certified and budget.relative_cost <= 0.6 and "budget" in budget.guarantee
    assert "test accuracy (check, not used for choosing)" in cert.markdown()


def test_lower_bound_matches_the_bound_on_the_served_rows():
    val = outputs(1000, 4)
    op = choose_operating_point("pcee", val, target_accuracy=0.8, bound="wsr")
    _, cal = split_fit_calibrate(val.labels, 0.5, 0)
    c = val.subset(cal)
    ex = op.policy.decide(c.logits)
    wrong = (c.logits[np.arange(len(c)), ex].argmax(-1) != c.labels).astype(float)
    assert op.accuracy_lower_bound == pytest.approx(1 - loss_upper_bound(wrong, 0.1, "wsr")[0])
    assert op.calibrate_accuracy == pytest.approx(1 - wrong.mean())


def test_uncertifiable_target_names_the_best_accuracy():
    val = outputs(600, 5)
    op = choose_operating_point("pcee", val, target_accuracy=0.999)
    assert not op.certified and "NOT certified" in op.guarantee
    assert op.policy.served_threshold() == 1.0  # the most conservative point is what an uncertified result serves
    with pytest.raises(
        NoCertifiablePointError, match=r"best certifiable accuracy is 0\.\d+ with 300 calibrate rows"
    ) as err:
        choose_operating_point("pcee", val, target_accuracy=0.999, require_certified=True)
    assert err.value.n_calibrate == 300 and 0 < err.value.best_certifiable_accuracy < 0.999


def test_bad_input_fails_clearly():
    val = outputs(300, 6)
    for kwargs, match in [
        ({"target_accuracy": 1.0}, "target_accuracy must be in"),
        ({"target_accuracy": 0.9, "risk": 0}, "risk must be in"),
        ({"target_accuracy": 0.9, "bound": "wilson"}, "unknown bound"),
        ({"target_accuracy": 0.9, "mode": "x"}, "unknown mode"),
        ({"mode": "budget"}, "flops_budget"),
        ({"target_accuracy": 0.9, "calibrate_fraction": 1.0}, "calibrate_fraction"),
    ]:
        with pytest.raises(ValueError, match=match):
            choose_operating_point("pcee", val, **kwargs)
    with pytest.raises(ValueError, match="decides with labels"):
        choose_operating_point("oracle", val, target_accuracy=0.9)
    with pytest.raises(ValueError, match="parameter pcee chooses"):
        choose_operating_point("pcee", val, target_accuracy=0.9, params={"delta": 0.5})


def test_calibration_size_check_before_training():
    with pytest.raises(ValueError, match="cannot certify accuracy 0.99 .*best possible"):
        check_calibration_size(100, 0.99, 0.1)  # 50 calibrate rows: 1 - 0.1**(1/50) = 0.045 of bound alone
    with pytest.raises(ValueError, match="risk must be in"):
        check_calibration_size(1000, 0.9, 1.5)
    with pytest.warns(UserWarning, match="only 180 calibrate rows"):
        assert check_calibration_size(359, 0.95, 0.1) == 180
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_calibration_size(2000, 0.9, 0.1) == 1000
    assert best_possible_accuracy(180, 0.1) == pytest.approx(0.1 ** (1 / 180), abs=1e-9)

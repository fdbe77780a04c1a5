"""Temperature scaling, MSDNet budgeted evaluation and the oracle."""

import numpy as np
import pytest

from pcee.calibration.scores import softmax
from pcee.policies.msdnet_budget import MSDNetBudgetPolicy
from pcee.policies.oracle import OraclePolicy, oracle_frontier
from pcee.policies.registry import POLICY_NAMES, build_policy
from pcee.policies.temperature import TemperaturePolicy, nll


def test_temperature_fit_lowers_validation_nll():
    # labels drawn from softmax(z): T = 1 is right for z, so 3z needs T > 1 and 0.3z needs T < 1
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(4000, 3, 6)) * np.array([1.0, 2.0, 3.0])[None, :, None]
    p_true = softmax(logits[:, -1])
    labels = (rng.random((4000, 1)) < np.cumsum(p_true, axis=1)).argmax(axis=1)
    logits[:, :2] = logits[:, 2:3] * np.array([0.5, 0.8])[None, :, None]  # the same ranking, damped
    flops = np.array([1.0, 2.0, 3.0])
    over = logits * 3.0
    under = logits * 0.3
    for z, side in ((over, 1), (under, -1)):
        p = TemperaturePolicy(tau=0.8).fit(z, labels, flops)
        assert p.temperatures_.shape == (z.shape[1],)
        for level in range(z.shape[1]):
            t = p.temperatures_[level]
            assert np.sign(np.log(t)) == side
            before, after = nll(z[:, level], labels, 1.0), nll(z[:, level], labels, t)
            assert after < before - 1e-3
            # a local optimum: nudging T either way does not lower the NLL
            assert after <= nll(z[:, level], labels, t * 1.05) + 1e-9
            assert after <= nll(z[:, level], labels, t / 1.05) + 1e-9


def test_temperature_decides_on_scaled_scores(make_outputs):
    logits, labels, flops = make_outputs(seed=5)
    p = TemperaturePolicy(tau=0.9).fit(logits * 3.0, labels, flops)
    q = TemperaturePolicy(tau=0.9)
    q.num_exits_, q.temperatures_ = p.num_exits_, np.ones(logits.shape[1])
    # with unit temperatures the policy is the plain threshold on the overconfident logits
    t = build_policy("threshold", tau=0.9).fit(logits * 3.0, labels, flops)
    np.testing.assert_array_equal(q.decide(logits * 3.0), t.decide(logits * 3.0))
    assert p.decide(logits * 3.0).mean() > t.decide(logits * 3.0).mean()  # cooled scores exit later


@pytest.mark.parametrize("q", [0.05, 0.5, 1.0, 1.3, 1.95])
def test_msdnet_budget_realised_exit_fractions(q, make_outputs):
    logits, labels, flops = make_outputs(n=1003, num_exits=5, seed=6)
    n, num_exits = logits.shape[:2]
    p = MSDNetBudgetPolicy(q=q).fit(logits, labels, flops)
    probs = q ** np.arange(1, num_exits + 1) / np.sum(q ** np.arange(1, num_exits + 1))
    np.testing.assert_allclose(p.probs_, probs)
    hist = np.bincount(p.decide(logits), minlength=num_exits)
    expected = np.floor(n * probs[:-1] + 1e-9).astype(int)
    np.testing.assert_array_equal(hist[:-1], expected)
    assert hist[-1] == n - expected.sum()


def test_msdnet_budget_bad_q():
    with pytest.raises(ValueError, match="q must be"):
        MSDNetBudgetPolicy(q=0.0)
    assert MSDNetBudgetPolicy.default_grid()[0] == 0.05


def test_oracle_needs_labels_and_picks_first_correct_exit():
    logits = np.zeros((3, 3, 2))
    logits[0, :, 1] = 1  # always predicts 1
    logits[1, 1:, 0] = 1  # predicts 1 at exit 0 (tie broken to 0? no: make it explicit)
    logits[1, 0, 1] = 1
    logits[2, :, 0] = 1
    labels = np.array([0, 0, 0])
    p = OraclePolicy().fit(logits, labels)
    np.testing.assert_array_equal(p.decide(logits, labels), [2, 1, 0])
    with pytest.raises(ValueError, match="needs labels"):
        p.decide(logits)
    with pytest.raises(ValueError, match="needs labels"):
        p.exit_mask(0, logits[:, 0])
    assert OraclePolicy.param_name is None and np.isnan(OraclePolicy.default_grid()).all()


def _point(exits, correct, flops):
    n = len(exits)
    return correct[np.arange(n), exits].mean(), flops[exits].mean()


def test_oracle_is_cheapest_at_equal_or_higher_accuracy(make_outputs):
    for seed in range(3):
        logits, labels, flops = make_outputs(n=600, seed=10 + seed)
        correct = logits.argmax(-1) == labels[:, None]
        oracle_acc, oracle_cost = _point(OraclePolicy().fit(logits, labels).decide(logits, labels), correct, flops)
        front_acc, front_cost = oracle_frontier(correct, flops)
        assert front_acc[-1] == pytest.approx(oracle_acc)
        assert np.all(np.diff(front_cost) >= 0)
        assert front_cost[-1] <= oracle_cost * (1 + 1e-12)
        n_points = 0
        for name in POLICY_NAMES:
            if name == "oracle":
                continue
            policy = build_policy(name)
            for value in policy.default_grid()[::4]:
                policy.set_params(**{policy.param_name: value})
                if not policy.is_fitted:
                    with pytest.warns(RuntimeWarning) if name == "eero" and value < flops[0] / flops[-1] else _null():
                        policy.fit(logits, labels, flops)
                acc, cost = _point(policy.decide(logits), correct, flops)
                n_points += 1
                assert acc <= oracle_acc + 1e-12
                if acc >= oracle_acc - 1e-12:
                    assert oracle_cost <= cost * (1 + 1e-12)
                # the frontier at this accuracy is never more expensive than the policy
                k = np.searchsorted(front_acc, acc - 1e-12)
                assert front_cost[k] <= cost * (1 + 1e-12)
        assert n_points > 100


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcee.policies.eero import EEROPolicy, eero_rates, solve_beta


def _realised_relative_cost(policy, logits, flops):
    return float(np.mean(flops[policy.decide(logits)] / flops[-1]))


def test_realised_budget_on_fit_data_over_a_grid(make_outputs):
    for seed in range(3):
        logits, labels, flops = make_outputs(n=997, num_exits=5, seed=seed)
        rel = flops / flops[-1]
        budgets = np.linspace(rel[0], 1.0, 25)
        costs = []
        for budget in budgets:
            p = EEROPolicy(budget=budget).fit(logits, labels, flops)
            assert p.feasible_
            planned = float(p.rates_ @ p.rel_cost_)
            assert planned <= budget + 1e-12
            realised = _realised_relative_cost(p, logits, flops)
            assert realised <= planned + 1e-12
            costs.append(realised)
        # the budget binds: tight budgets cost little, loose ones allow more compute
        assert costs[0] < costs[-1]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(20, 400),
    num_exits=st.integers(2, 6),
    frac=st.floats(0.0, 1.0),
    score=st.sampled_from(["max_prob", "entropy", "margin"]),
)
def test_realised_budget_property(seed, n, num_exits, frac, score):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, num_exits, 4)) * rng.uniform(0.1, 4)
    logits = np.round(logits, 1)  # ties in the scores
    labels = rng.integers(0, 4, n)
    flops = np.cumsum(rng.uniform(0.1, 3.0, num_exits))
    rel = flops / flops[-1]
    budget = rel[0] + frac * (1 - rel[0])
    p = EEROPolicy(budget=budget, score=score).fit(logits, labels, flops)
    assert _realised_relative_cost(p, logits, flops) <= budget + 1e-12


def test_rates_and_beta():
    errors = np.array([0.5, 0.3, 0.1])
    cost = np.array([0.2, 0.6, 1.0])
    r0 = eero_rates(errors, cost, 0.0, 0.04)
    np.testing.assert_allclose(r0.sum(), 1.0)
    expected = (1 / cost) * np.exp(-errors / 0.04)
    np.testing.assert_allclose(r0, expected / expected.sum())
    beta, rates, feasible = solve_beta(errors, cost, 0.5, 0.04)
    assert feasible and beta > 0
    assert rates @ cost <= 0.5 and rates @ cost > 0.5 - 1e-6  # the smallest β: the budget is met tightly
    beta0, _, _ = solve_beta(errors, cost, 1.0, 0.04)
    assert beta0 == 0.0


def test_infeasible_budget_sends_everything_to_exit_one(make_outputs):
    logits, labels, flops = make_outputs(n=300, seed=4)
    rel = flops / flops[-1]
    with pytest.warns(RuntimeWarning, match="below the cost of the first exit"):
        p = EEROPolicy(budget=rel[0] / 2).fit(logits, labels, flops)
    assert not p.feasible_
    np.testing.assert_array_equal(p.decide(logits), 0)


def test_eero_bad_params_and_missing_flops(make_outputs):
    logits, labels, _ = make_outputs(n=50)
    with pytest.raises(ValueError, match="budget"):
        EEROPolicy(budget=0)
    with pytest.raises(ValueError, match="lam"):
        EEROPolicy(lam=-1)
    with pytest.raises(ValueError, match="flops"):
        EEROPolicy().fit(logits, labels, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EEROPolicy(budget=1.0).fit(logits, labels, np.arange(1.0, logits.shape[1] + 1))

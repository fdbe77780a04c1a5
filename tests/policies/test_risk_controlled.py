import json

import numpy as np
import pytest

from pcee.policies.estimator import first_passing_exit
from pcee.policies.risk_controlled import RiskControlledPCEEPolicy
from pcee.sweep import exit_counts_closed_form
from tests.population import Population


def test_accuracy_guarantee_over_200_calibration_draws():
    pop = Population()
    alpha, eta, draws = 0.8, 0.1, 200
    assert pop.p_correct[:, -1].mean() > alpha + 0.05  # the target is reachable by the final exit
    violations, naive_violations, early = 0, 0, []
    for d in range(draws):
        rng = np.random.default_rng(d)
        logits, labels = pop.draw(2000, rng)
        policy = RiskControlledPCEEPolicy(alpha=alpha, eta=eta, seed=d).fit(logits, labels, pop.flops)
        acc, exits = pop.accuracy(policy, policy.served_threshold())
        violations += acc < alpha
        early.append(np.mean(exits < pop.num_exits - 1))
        # the same fixed-sequence selection with the plug-in error instead of the bound
        ok = policy.errors_ / policy.n_calib_ <= 1 - alpha
        n_ok = int(np.argmin(ok)) if not ok.all() else ok.size
        if n_ok:
            naive_violations += pop.accuracy(policy, policy.grid_[n_ok - 1])[0] < alpha
    # binomial sampling slack: 3 standard deviations of a fraction over 200 draws at rate eta
    slack = 3 * np.sqrt(eta * (1 - eta) / draws)
    assert violations / draws <= eta + slack
    # the test has teeth: without the bound the rule misses alpha more often than eta allows,
    # and the certified rule still exits early for a good share of samples
    assert naive_violations / draws > eta
    assert np.mean(early) > 0.3


def test_closed_form_errors_equal_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, num_exits = rng.integers(1, 60), rng.integers(1, 6)
        mv = np.round(rng.random((n, num_exits - 1)), 2)  # ties on purpose
        correct = rng.random((n, num_exits)) < 0.6
        grid = np.round(1 - 0.01 * np.arange(101), 10)
        fast = n - exit_counts_closed_form(mv, correct, grid)[0]  # the closed form risk control counts errors with
        for j, d in enumerate(grid):
            exits = first_passing_exit(mv >= d)
            assert fast[j] == n - correct[np.arange(n), exits].sum()


def test_fixed_sequence_selection_and_nothing_certified(make_outputs):
    logits, labels, flops = make_outputs(n=2000, seed=1)
    p = RiskControlledPCEEPolicy(alpha=0.7, eta=0.1, seed=3).fit(logits, labels, flops)
    assert p.certified_ and p.delta_ is not None
    k = int(np.flatnonzero(p.grid_ == p.delta_)[0])
    assert np.all(p.ucb_[: k + 1] <= 1 - 0.7 + 1e-9)  # every δ' tested down to the chosen one passed
    if k + 1 < p.grid_.size:
        assert p.ucb_[k + 1] > 1 - 0.7 - 1e-9  # and the next one failed
    assert p.delta_ >= p.delta
    np.testing.assert_array_equal(p.decide(logits), first_passing_exit(p.map_values(logits) >= p.delta_))
    # changing alpha re-selects without refitting the maps
    maps_before = p.maps_
    p.set_params(alpha=0.99999)
    assert p.maps_ is maps_before
    assert not p.certified_ and p.delta_ is None
    np.testing.assert_array_equal(p.decide(logits), np.full(len(labels), logits.shape[1] - 1))


def test_hoeffding_bentkus_is_more_conservative(make_outputs):
    logits, labels, flops = make_outputs(n=2000, seed=2)
    cp = RiskControlledPCEEPolicy(alpha=0.7, bound="clopper-pearson").fit(logits, labels, flops)
    hb = RiskControlledPCEEPolicy(alpha=0.7, bound="hoeffding-bentkus").fit(logits, labels, flops)
    assert np.all(hb.ucb_ >= cp.ucb_ - 1e-9)
    assert hb.delta_ is None or hb.delta_ >= cp.delta_


def test_json_round_trip_and_bad_params(make_outputs):
    logits, labels, flops = make_outputs(n=800, seed=3)
    p = RiskControlledPCEEPolicy(alpha=0.75, calib_fraction=0.4, seed=7).fit(logits, labels, flops)
    q = RiskControlledPCEEPolicy.from_dict(json.loads(json.dumps(p.to_dict(), allow_nan=False)))
    assert q.delta_ == p.delta_
    np.testing.assert_array_equal(q.decide(logits), p.decide(logits))
    for kwargs, match in [
        ({"alpha": 1.0}, "alpha"),
        ({"eta": 0}, "eta"),
        ({"bound": "bonferroni"}, "clopper-pearson"),
        ({"calib_fraction": 1.0}, "calib_fraction"),
        ({"delta": 2}, "delta"),
    ]:
        with pytest.raises(ValueError, match=match):
            RiskControlledPCEEPolicy(**kwargs)

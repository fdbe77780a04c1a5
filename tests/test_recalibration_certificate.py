"""Recalibration keeps certificates true: what is served is the certified point of the maps served.

(a) risk-controlled: the refit policy's δ' is the fixed-sequence choice on the held-out rows with
    the refit maps (recomputed here from scratch), not the stale δ' of the old maps;
(b) a certified PCEE / PCEE-WS refit: δ is chosen again on the held-out rows and is certified;
(c) the guarantee: over many draws of recent rows from a shifted finite population (exact
    accuracy), the served recalibrated point misses α in at most η (+ binomial slack) of draws.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pcee.calibration.bounds import loss_upper_bound
from pcee.operating_point import OperatingPoint, choose_operating_point, closed_form_exits, fixed_sequence_passes
from pcee.outputs import ExitOutputs
from pcee.policies.estimator import first_passing_exit
from pcee.policies.pcee import PCEEPolicy
from pcee.policies.pcee_ws import PCEEWSPolicy
from pcee.policies.risk_controlled import RiskControlledPCEEPolicy
from pcee.recalibration import champion_certificate, recalibrate, recent_weight, refit_policy, split_recent
from tests.population import Population
from tests.synthetic import make_outputs

SHIFT = (0.3, 0.2, 0.0)  # early exits become over-confident; the final exit keeps its accuracy
ALPHA, ETA = 0.8, 0.1


def _fixed_sequence_from_scratch(policy, logits, labels, grid, alpha, eta, bound="clopper-pearson"):
    """The Learn-then-Test choice by brute force: δ from high to low, stop at the first failure."""
    mv = policy.map_values(logits)
    chosen, ucbs = None, []
    for d in grid:  # most conservative first
        exits = first_passing_exit(mv >= d)
        wrong = (logits[np.arange(len(labels)), exits].argmax(-1) != labels).astype(np.float64)
        ucb = float(loss_upper_bound(wrong, eta, bound)[0])
        ucbs.append(ucb)
        if ucb > 1.0 - alpha + 1e-12:
            break
        chosen = float(d)
    return chosen, np.array(ucbs)


@pytest.fixture(scope="module")
def clean():
    return make_outputs(3000, seed=0)


@pytest.fixture(scope="module")
def recent():
    return make_outputs(1500, gaps=SHIFT, seed=3)


# ---------------------------------------------------------------------------------------------
# (a) risk-controlled
# ---------------------------------------------------------------------------------------------
def test_risk_controlled_refit_recertifies_on_held_out_rows(clean, recent):
    policy = RiskControlledPCEEPolicy(alpha=ALPHA, eta=ETA).fit(*clean)
    before = policy.to_dict()
    logits, labels, flops = recent
    result = recalibrate(policy, logits, labels, flops=flops, seed=0)
    new = result.policy
    assert result.gate == "certificate" and result.status == "certified" and result.accepted, result.reason
    assert policy.to_dict() == before  # the served policy is not touched

    # the refit maps are the maps refit on the refit rows only; the certificate uses the held-out rows
    hold, refit = split_recent(len(labels), 0.3, 0)
    weight = recent_weight(float(np.sum(policy.maps_.maps_[0].counts_)), len(refit))
    expected_maps = refit_policy(policy, logits[refit], labels[refit], weight).maps_
    assert new.maps_.to_dict() == expected_maps.to_dict()
    assert new.n_calib_ == len(hold) == result.n_holdout

    # δ' recomputed from scratch: the fixed sequence on the held-out rows with the refit maps
    chosen, ucbs = _fixed_sequence_from_scratch(new, logits[hold], labels[hold], new.grid_, ALPHA, ETA)
    assert chosen is not None and new.delta_ == pytest.approx(chosen)
    np.testing.assert_allclose(new.ucb_[: ucbs.size], ucbs)
    # ... and not the stale δ' of the old maps (the bug kept grid_/errors_/delta_ of the old ones)
    assert new.delta_ != policy.delta_
    stale_chosen, _ = _fixed_sequence_from_scratch(policy, logits[hold], labels[hold], new.grid_, ALPHA, ETA)
    assert stale_chosen != new.delta_

    # the served threshold is the certified δ', never the grid floor (the ``delta`` parameter)
    assert result.old_threshold == policy.delta_ != policy.delta
    assert result.new_threshold == new.delta_ == new.served_threshold()
    np.testing.assert_array_equal(new.decide(logits), first_passing_exit(new.map_values(logits) >= new.delta_))

    # the certificate holds: every δ' down to the chosen one passed, its lower bound clears α
    k = int(np.flatnonzero(new.grid_ == new.delta_)[0])
    assert np.all(new.ucb_[: k + 1] <= 1 - ALPHA + 1e-12)
    assert result.certified and result.accuracy_lower_bound >= ALPHA
    assert result.accuracy_lower_bound == pytest.approx(1 - new.ucb_[k])
    fresh_logits, fresh_labels, _ = make_outputs(20000, gaps=SHIFT, seed=99)
    fresh_acc = (fresh_logits[np.arange(len(fresh_labels)), new.decide(fresh_logits)].argmax(-1) == fresh_labels).mean()
    stale_acc = (
        fresh_logits[np.arange(len(fresh_labels)), policy.decide(fresh_logits)].argmax(-1) == fresh_labels
    ).mean()
    assert fresh_acc >= ALPHA > stale_acc
    # the old maps' held-out numbers are reported at their own threshold, for comparison
    assert result.old_accuracy < ALPHA and result.old_accuracy_lower_bound < ALPHA

    # the certificate travels with the policy: a JSON round trip keeps δ' (it re-selects on the held-out rows)
    again = RiskControlledPCEEPolicy.from_dict(json.loads(json.dumps(new.to_dict(), allow_nan=False)))
    assert again.delta_ == new.delta_
    # and reads as an operating point
    op = OperatingPoint(**result.certificate())
    assert op.certified and op.served_threshold == new.delta_ and op.n_calibrate == len(hold) and op.value == ALPHA


def test_risk_controlled_not_certified_serves_only_its_most_conservative_point(clean, recent):
    policy = RiskControlledPCEEPolicy(alpha=ALPHA, eta=ETA).fit(*clean)
    logits, labels, flops = recent
    result = recalibrate(policy, logits, labels, flops=flops, target_accuracy=0.95)  # above the final exit
    # no exit threshold certifies: the most conservative point (everyone to the final exit) is served with an answer
    # rule (certified ρ: "selective"; else a point-estimate ρ: "conservative"), because the held-out rows show the old
    # maps miss 0.95 too; it says it is not certified
    assert not result.certified and result.status in ("selective", "conservative")
    assert result.old_accuracy_lower_bound < 0.95 and result.accepted
    assert result.policy.delta_ is None and result.new_threshold is None
    assert result.policy.alpha == 0.95 and policy.alpha == ALPHA  # the copy carries the asked certificate
    rule = result.answer_rule
    assert rule["threshold"] > 0.0 and rule["kind"] == (
        "certified" if result.status == "selective" else "not_certified"
    )
    assert ("answer rule does" in result.reason) if result.status == "selective" else ("NOT certified" in result.reason)
    # where the held-out rows show the old maps meet the target, an uncertifiable refit that does not improve the
    # shortfall is not served
    easy = recalibrate(policy, logits, labels, flops=flops, target_accuracy=0.5, min_improvement=1.0)
    assert easy.status == "certified" or (
        easy.old_accuracy_lower_bound >= 0.5 and easy.status in ("selective", "not_certified")
    )


# ---------------------------------------------------------------------------------------------
# (b) certified PCEE / PCEE-WS
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy_cls", [PCEEPolicy, PCEEWSPolicy])
def test_certified_pcee_refit_chooses_a_certified_delta(policy_cls, clean, recent):
    policy = policy_cls(delta=0.6).fit(*clean)
    logits, labels, flops = recent
    result = recalibrate(
        policy, logits, labels, flops=flops, target_accuracy=ALPHA, risk=ETA, bound="clopper-pearson", seed=1
    )
    assert result.gate == "certificate" and result.status == "certified" and result.accepted, result.reason
    assert policy.delta == 0.6  # untouched
    new = result.policy
    hold, _ = split_recent(len(labels), 0.3, 1)
    grid = np.sort(policy_cls.default_grid())[::-1]
    chosen, ucbs = _fixed_sequence_from_scratch(new, logits[hold], labels[hold], grid, ALPHA, ETA)
    assert chosen is not None
    assert new.delta == pytest.approx(chosen) == result.new_threshold
    assert result.old_threshold == 0.6
    # certified on the held-out rows: its bound, recomputed, clears α
    exits = new.decide(logits[hold])
    wrong = (logits[hold][np.arange(len(hold)), exits].argmax(-1) != labels[hold]).astype(np.float64)
    lower = 1 - loss_upper_bound(wrong, ETA, "clopper-pearson")[0]
    assert lower >= ALPHA and result.accuracy_lower_bound == pytest.approx(lower)
    assert (result.target_accuracy, result.risk, result.bound, result.n_holdout) == (
        ALPHA,
        ETA,
        "clopper-pearson",
        len(hold),
    )
    assert result.delta == ALPHA and result.new_shortfall == 0.0  # shortfalls are measured against α
    assert json.dumps(result.to_dict())  # plain JSON


def test_certified_pcee_not_certified_and_bad_arguments(clean, recent):
    policy = PCEEPolicy(delta=0.6).fit(*clean)
    logits, labels, flops = recent
    result = recalibrate(policy, logits, labels, flops=flops, target_accuracy=0.97, min_improvement=1.0)
    # no δ certifies 0.97 and the old maps miss it on the held-out rows too: the most conservative point is served
    # only with an answer rule, and it says whether that rule is certified
    assert not result.certified and result.status in ("selective", "conservative") and result.accepted
    assert result.policy.delta == 1.0 and result.old_accuracy_lower_bound < 0.97
    assert result.answer_rule["threshold"] > 0.0
    assert result.best_certifiable_accuracy < 0.97 and (result.risk, result.bound) == (0.1, "clopper-pearson")
    small = recalibrate(policy, logits[:50], labels[:50], target_accuracy=ALPHA, min_labels=100)
    assert small.status == "too_few_labels" and small.target_accuracy == ALPHA and small.policy is None
    with pytest.raises(ValueError, match="delta is chosen by the certificate"):
        recalibrate(policy, logits, labels, delta=0.8, target_accuracy=ALPHA)
    with pytest.raises(ValueError, match="target_accuracy"):
        recalibrate(policy, logits, labels, risk=0.05)
    with pytest.raises(ValueError, match="target_accuracy"):
        recalibrate(policy, logits, labels, target_accuracy=1.5)


def test_champion_certificate_from_meta_and_tags():
    op = {"mode": "certified", "target_accuracy": 0.9, "risk": 0.05, "bound": "wsr"}
    assert champion_certificate({"operating_point": op}, {"target_accuracy": "0.5"}) == {
        "target_accuracy": 0.9,
        "risk": 0.05,
        "bound": "wsr",
    }
    assert champion_certificate({"operating_point": {**op, "mode": "point"}}, {"target_accuracy": "0.5"}) == {}
    assert champion_certificate({}, {"target_accuracy": "0.85"}) == {"target_accuracy": 0.85}
    assert champion_certificate(None, {"target_accuracy": "0.85", "risk": "0.2", "bound": "hoeffding-bentkus"}) == {
        "target_accuracy": 0.85,
        "risk": 0.2,
        "bound": "hoeffding-bentkus",
    }
    assert champion_certificate({"data": "x"}, {}) == {}
    assert champion_certificate({}, {"target_accuracy": "0.85", "mode": "point"}) == {}


# ---------------------------------------------------------------------------------------------
# (c) the miss rate over draws from a shifted population
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy_name", ["pcee", "risk-controlled"])
def test_recalibrated_certificate_miss_rate_over_shifted_draws(policy_name):
    alpha, eta, draws, n_recent, holdout = 0.7, 0.1, 100, 1500, 0.3
    # the policy tests' finite population; more label noise is the shift
    clean, shifted = Population(noise=(0.0, 0.2), dtype=np.float32), Population(noise=(0.05, 0.35), dtype=np.float32)
    assert shifted.p_correct[:, -1].mean() > alpha + 0.05  # the final exit still reaches α after the shift
    logits, labels = clean.draw(2000, np.random.default_rng(1000))
    champion = choose_operating_point(
        policy_name, ExitOutputs(logits, labels, clean.flops), target_accuracy=alpha, risk=eta
    )
    assert champion.certified
    assert shifted.policy_accuracy(champion.policy)[0] < alpha  # the shift breaks the champion's certificate
    cert = champion_certificate({"operating_point": champion.to_dict()})
    grid = np.sort(PCEEPolicy.default_grid())[::-1]

    misses, naive_misses, served, early = 0, 0, 0, []
    for d in range(draws):
        rng = np.random.default_rng(d)
        rl, ry = shifted.draw(n_recent, rng)
        result = recalibrate(champion.policy, rl, ry, flops=clean.flops, holdout_fraction=holdout, seed=d, **cert)
        assert result.gate == "certificate" and result.target_accuracy == alpha and result.risk == eta
        if not result.accepted:
            continue
        served += 1
        misses += shifted.policy_accuracy(result.policy)[0] < alpha
        early.append(np.mean(result.policy.decide(shifted.logits) < shifted.num_exits - 1))
        if policy_name == "pcee":  # the same fixed sequence on the held-out accuracy itself, no bound
            hold, _ = split_recent(n_recent, holdout, d)
            exits = closed_form_exits(result.policy.map_values(rl[hold]), grid)
            acc = (rl[hold][np.arange(len(hold))[None, :], exits].argmax(-1) == ry[hold][None, :]).mean(axis=1)
            n_ok = fixed_sequence_passes(acc, alpha)
            if n_ok:
                naive = PCEEPolicy.from_dict(result.policy.to_dict()).set_params(delta=float(grid[n_ok - 1]))
                naive_misses += shifted.policy_accuracy(naive)[0] < alpha
    slack = 3 * np.sqrt(eta * (1 - eta) / draws)
    assert misses / draws <= eta + slack
    # not vacuous: most draws certify and serve early exits; without the bound the choice misses often
    assert served >= 0.8 * draws and np.mean(early) > 0.5
    if policy_name == "pcee":
        assert naive_misses / draws > eta

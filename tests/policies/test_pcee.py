import json

import numpy as np
import pytest

from pcee.policies.pcee import PCEEPolicy
from pcee.policies.pcee_ws import PCEEWSPolicy
from pcee.policies.threshold import ThresholdPolicy


def _logits_with_confidence(conf, num_classes=2):
    """Two-class logits (N, K) whose max-prob is exactly ``conf`` for class 0."""
    conf = np.asarray(conf, dtype=np.float64)
    z = np.zeros((conf.size, num_classes))
    z[:, 0] = np.log(conf) - np.log1p(-conf)
    return z


def _hand_built():
    """3 exits; exit 0: confidences in bin 9 (always right) and bin 5 (half right);
    exit 1: bin 9 half right, bin 7 always right, plus 5 lonely samples in bin 6 (all right)."""
    conf0 = np.array([0.95] * 20 + [0.55] * 20)
    conf1 = np.array([0.95] * 20 + [0.75] * 15 + [0.65] * 5)
    labels = np.zeros(40, dtype=np.int64)
    logits = np.zeros((40, 3, 2))
    logits[:, 0] = _logits_with_confidence(conf0)
    logits[:, 1] = _logits_with_confidence(conf1)
    logits[:, 2] = _logits_with_confidence(np.full(40, 0.6))
    # exit 0 wrong on half of the 0.55 group; exit 1 wrong on half of the 0.95 group
    logits[20:30, 0] = logits[20:30, 0, ::-1]
    logits[0:10, 1] = logits[0:10, 1, ::-1]
    return logits, labels, np.array([1.0, 2.0, 3.0])


def test_hand_built_maps_and_decisions():
    logits, labels, flops = _hand_built()
    p = PCEEPolicy(delta=0.9, n_bins=10, min_count=10).fit(logits, labels, flops)
    m0, m1 = p.maps_[0], p.maps_[1]
    assert m0.acc_[9] == 1.0 and m0.acc_[5] == 0.5 and m0.counts_[9] == 20
    assert m1.acc_[9] == 0.5 and m1.acc_[7] == 1.0 and m1.acc_[6] == 0.0 and m1.raw_acc_[6] == 1.0

    # a sample with confidence 0.95 at exit 0, 0.75 at exit 1: the first passing exit (0) wins
    test = np.zeros((4, 3, 2))
    test[:, 0] = _logits_with_confidence([0.95, 0.55, 0.55, 0.55])
    test[:, 1] = _logits_with_confidence([0.75, 0.75, 0.95, 0.65])
    test[:, 2] = _logits_with_confidence([0.6] * 4)
    np.testing.assert_array_equal(p.decide(test), [0, 1, 2, 2])
    # sample 3: bin 6 of exit 1 was always right but has 5 < min_count samples, so it never exits
    assert p.map_values(test)[3, 1] == 0.0
    # with δ = 0 every sample leaves at exit 0; with δ = 1 only perfect bins exit
    np.testing.assert_array_equal(p.set_params(delta=0.0).decide(test), [0, 0, 0, 0])
    np.testing.assert_array_equal(p.set_params(delta=1.0).decide(test), [0, 1, 2, 2])
    # lowering min_count opens the thin bin
    p2 = PCEEPolicy(delta=0.9, n_bins=10, min_count=5).fit(logits, labels, flops)
    assert p2.decide(test)[3] == 1


def test_last_exit_always_answers(outputs):
    logits, labels, flops = outputs
    p = PCEEPolicy(delta=1.0, min_count=10**9).fit(logits, labels, flops)
    np.testing.assert_array_equal(p.decide(logits), np.full(len(labels), logits.shape[1] - 1))


def test_exit_mask_matches_map_values_and_base_decide(outputs):
    logits, labels, flops = outputs
    for policy in (PCEEPolicy(delta=0.8), PCEEWSPolicy(delta=0.8, binning="equal_mass")):
        policy.fit(logits, labels, flops)
        mv = policy.map_values(logits)
        assert mv.shape == (len(labels), logits.shape[1] - 1)
        for level in range(logits.shape[1] - 1):
            np.testing.assert_array_equal(policy.exit_mask(level, logits[:, level]), mv[:, level] >= 0.8)
            np.testing.assert_array_equal(policy.expected_accuracy(level, logits[:, level]), mv[:, level])
        # the vectorised decide equals the generic exit-by-exit one of ExitPolicy
        from pcee.policies.base import ExitPolicy

        np.testing.assert_array_equal(policy.decide(logits), ExitPolicy.decide(policy, logits))
        assert policy.expected_accuracy(logits.shape[1] - 1, logits[:, -1]).shape == (len(labels),)


def test_pcee_tracks_delta_on_fit_data(outputs):
    logits, labels, flops = outputs
    p = PCEEPolicy().fit(logits, labels, flops)
    exits_lo = p.set_params(delta=0.5).decide(logits)
    exits_hi = p.set_params(delta=0.95).decide(logits)
    assert np.all(exits_hi >= exits_lo)  # a higher target never exits earlier
    correct = logits.argmax(-1) == labels[:, None]
    acc_hi = correct[np.arange(len(labels)), exits_hi].mean()
    assert acc_hi >= correct[:, 0].mean()


def test_pcee_ws_map_is_monotone_and_defined_everywhere(outputs):
    logits, labels, flops = outputs
    p = PCEEWSPolicy(delta=0.9, n_bins=30).fit(logits[:200], labels[:200], flops)
    for level in range(logits.shape[1]):
        m = p.maps_[level]
        assert np.all(np.diff(m.acc_) >= -1e-12)
        assert np.all(np.isfinite(m.acc_))
    assert "min_count" not in p.get_params()


def test_threshold_policy(outputs):
    logits, labels, flops = outputs
    t = ThresholdPolicy(tau=0.7).fit(logits, labels, flops)
    exits = t.decide(logits)
    from pcee.calibration.scores import confidence

    s = confidence(logits, "max_prob")
    for i in range(0, len(labels), 97):
        passing = np.flatnonzero(s[i, :-1] >= 0.7)
        assert exits[i] == (passing[0] if passing.size else logits.shape[1] - 1)
    e = ThresholdPolicy(tau=0.7, score="entropy").fit(logits, labels, flops)
    assert not np.array_equal(e.decide(logits), exits)


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (PCEEPolicy, {"delta": 1.5}, "delta"),
        (PCEEPolicy, {"delta": -0.1}, "delta"),
        (PCEEPolicy, {"score": "logit"}, "max_prob, entropy, margin"),
        (PCEEPolicy, {"binning": "log"}, "binning"),
        (PCEEPolicy, {"n_bins": 0}, "n_bins"),
        (PCEEWSPolicy, {"bandwidth": -1.0}, "bandwidth"),
        (ThresholdPolicy, {"tau": 2}, "tau"),
        (ThresholdPolicy, {"score": "x"}, "valid scores"),
    ],
)
def test_bad_parameters_raise_naming_them(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
    with pytest.raises(ValueError, match=match):
        cls().set_params(**kwargs)


def test_set_params_keeps_or_drops_fitted_state(outputs):
    logits, labels, flops = outputs
    p = PCEEPolicy().fit(logits, labels, flops)
    p.set_params(delta=0.7)
    assert p.is_fitted  # δ is applied at decision time
    p.set_params(n_bins=20)
    assert not p.is_fitted  # the maps depend on n_bins: stale state is dropped
    with pytest.raises(ValueError, match="not fitted"):
        p.decide(logits)
    with pytest.raises(ValueError, match="unknown parameter"):
        p.set_params(tau=0.5)


def test_pcee_json_round_trip(outputs):
    logits, labels, flops = outputs
    p = PCEEPolicy(delta=0.85, binning="equal_mass").fit(logits, labels, flops)
    q = PCEEPolicy.from_dict(json.loads(json.dumps(p.to_dict(), allow_nan=False)))
    np.testing.assert_array_equal(q.decide(logits), p.decide(logits))
    np.testing.assert_array_equal(q.map_values(logits), p.map_values(logits))

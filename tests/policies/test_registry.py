import json

import numpy as np
import pytest

from pcee.policies.base import ExitPolicy
from pcee.policies.registry import PCEE_TYPE_POLICIES, POLICY_NAMES, build_policy, policy_from_dict


def test_names():
    assert POLICY_NAMES == (
        "pcee",
        "pcee-ws",
        "threshold",
        "temperature",
        "msdnet-budget",
        "eero",
        "oracle",
        "risk-controlled",
    )


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_round_trips_through_json_with_identical_decisions(name, make_outputs):
    logits, labels, flops = make_outputs(n=800, seed=21)
    test_logits, test_labels, _ = make_outputs(n=300, seed=22)
    policy = build_policy(name)
    assert isinstance(policy, ExitPolicy)
    policy.fit(logits, labels, flops)
    text = json.dumps(policy.to_dict(), allow_nan=False)  # strict JSON: no NaN/Infinity
    clone = policy_from_dict(json.loads(text))
    assert type(clone) is type(policy) and clone.get_params() == policy.get_params()
    np.testing.assert_array_equal(clone.decide(test_logits, test_labels), policy.decide(test_logits, test_labels))
    num_exits = logits.shape[1]
    for level in range(num_exits):
        np.testing.assert_array_equal(
            clone.expected_accuracy(level, test_logits[:, level]),
            policy.expected_accuracy(level, test_logits[:, level]),
        )
    if name != "oracle":
        for level in range(num_exits - 1):
            np.testing.assert_array_equal(
                clone.exit_mask(level, test_logits[:, level]), policy.exit_mask(level, test_logits[:, level])
            )
        # the generic exit-by-exit decide is the policy's decide
        np.testing.assert_array_equal(ExitPolicy.decide(policy, test_logits), policy.decide(test_logits))
    if name in PCEE_TYPE_POLICIES:
        np.testing.assert_array_equal(clone.map_values(test_logits), policy.map_values(test_logits))
    # an unfitted policy round-trips too, with no state
    fresh = build_policy(name)
    assert policy_from_dict(json.loads(json.dumps(fresh.to_dict()))).is_fitted is False


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_swept_parameter_and_grid(name):
    policy = build_policy(name)
    grid = policy.default_grid()
    assert grid.ndim == 1 and grid.size >= 1
    if policy.param_name is not None:
        assert policy.param_name in policy.get_params()
        policy.set_params(**{policy.param_name: grid[len(grid) // 2]})
        assert policy.get_params()[policy.param_name] == grid[len(grid) // 2]


def test_bad_names_and_params():
    with pytest.raises(ValueError, match="valid: pcee, pcee-ws"):
        build_policy("pceee")
    with pytest.raises(ValueError, match="unknown parameter.*tau"):
        build_policy("pcee", tau=0.5)
    with pytest.raises(ValueError, match="'name'"):
        policy_from_dict({"params": {}})
    with pytest.raises(ValueError, match="unknown policy"):
        policy_from_dict({"name": "nope"})


def test_exit_mask_rejects_final_and_out_of_range_levels(make_outputs):
    logits, labels, flops = make_outputs(n=100)
    p = build_policy("threshold").fit(logits, labels, flops)
    with pytest.raises(ValueError, match="final exit always answers"):
        p.exit_mask(logits.shape[1] - 1, logits[:, -1])
    with pytest.raises(ValueError, match="exit level"):
        p.expected_accuracy(99, logits[:, 0])

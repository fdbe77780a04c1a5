"""The policy contract the runner relies on, for every registered policy.

A policy carries everything about itself: the runner asks it for its rule (numpy and torch forms) and
its score, and answers exactly what ``policy.decide`` and ``policy.expected_accuracy`` say, on both
decision paths (``decide="numpy"`` and ``decide="torch"``, run on CPU). Capabilities are protocols,
checked from what a policy says about itself; an unknown score is an error.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pcee.calibration.scores import SCORES, check_score, confidence, torch_confidence
from pcee.inference.runner import EarlyExitRunner
from pcee.policies import registry
from pcee.policies.base import as_map_policy, as_self_certifying
from pcee.policies.estimator import PolicyEstimator, check_outputs
from pcee.policies.registry import POLICY_NAMES, build_policy, get_policy_class
from pcee.policies.rules import AskPolicy, ScoreThreshold
from tests.inference.exactness import LogitsModel, assert_answers, reference_columns
from tests.synthetic import make_graded_outputs

torch.set_num_threads(1)


def contract_data(seed: int = 0):
    """Validation outputs, and test logits holding copies of validation rows (ties with fitted thresholds)."""
    val, labels, flops = make_graded_outputs(n=400, num_exits=4, num_classes=6, seed=seed)
    test, _, _ = make_graded_outputs(n=300, num_exits=4, num_classes=6, seed=seed + 1)
    test = np.concatenate([test, val[:60]])
    return val, labels, flops, test[np.random.default_rng(seed).permutation(len(test))]


def policies_over_grid(name: str, val, labels, flops):
    """The policy fitted at three values of its swept parameter (its own grid's quartiles)."""
    cls = get_policy_class(name)
    if cls.param_name is None:
        return [build_policy(name).fit(val, labels, flops)]
    grid = cls.default_grid()
    values = [float(grid[int(q * (grid.size - 1))]) for q in (0.25, 0.5, 0.75)]
    return [build_policy(name, **{cls.param_name: v}).fit(val, labels, flops) for v in values]


@pytest.mark.filterwarnings("ignore:EERO budget")  # a grid value below exit 1's cost: all leave there
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_the_runner_answers_what_the_policy_decides_on_both_paths(name):
    val, labels, flops, test = contract_data()
    model = LogitsModel(val.shape[1])
    if get_policy_class(name).decides_with_labels:
        with pytest.raises(ValueError, match="needs labels"):
            EarlyExitRunner(model, build_policy(name).fit(val, labels, flops), flops)
        return
    mixes = 0
    for policy in policies_over_grid(name, val, labels, flops):
        rule = policy.exit_rule()
        assert rule.score == policy.score and rule.on_device("cpu") is not None  # a torch form: no slow path
        ref = reference_columns(policy, test, policy.score)
        mixes += len(np.unique(ref["exit"])) >= 2
        for decide in ("numpy", "torch"):
            for batch_size, regroup in ((64, 4), (24, 1)):
                runner = EarlyExitRunner(model, policy, flops, batch_size=batch_size, decide=decide, regroup=regroup)
                assert_answers(runner.run(test), ref, flops)
    assert mixes >= 1, name  # some value of the grid sends samples to several exits


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_capabilities_are_protocols_read_from_the_policy(name):
    val, labels, flops, _ = contract_data()
    policy = build_policy(name).fit(val, labels, flops)
    for flag, check in (("certifies_itself", as_self_certifying), ("has_reliability_maps", as_map_policy)):
        if getattr(policy, flag):
            assert check(policy) is policy
        else:
            with pytest.raises(TypeError, match=f"{name!r} does not say {flag}"):
                check(policy)


class GapPolicy(PolicyEstimator):
    """A policy written outside the library, as a user would: a class with a name, its parameters, a
    fit and a rule. Samples leave where the margin score reaches ``gap`` (the same at every exit)."""

    name = "gap"
    param_name = "gap"

    def __init__(self, gap: float = 0.5) -> None:
        self.gap = gap
        self.score = "margin"

    def fit(self, logits, labels=None, flops=None):
        logits, _, _ = check_outputs(logits, labels, flops)
        self.num_exits_ = logits.shape[1]
        return self

    def _rule(self):
        return ScoreThreshold(self.score, [float(self.gap)] * self.num_exits_)


def test_a_new_policy_is_one_class_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(registry._POLICIES, "gap", GapPolicy)  # the registry line
    val, labels, flops, test = contract_data()
    policy = build_policy("gap", gap=0.4).fit(val, labels, flops)
    ref = reference_columns(policy, test, "margin")
    assert len(np.unique(ref["exit"])) >= 2
    np.testing.assert_array_equal(
        ref["expected_accuracy"], confidence(test, "margin")[np.arange(len(test)), ref["exit"]]
    )
    for decide in ("numpy", "torch"):
        assert_answers(
            EarlyExitRunner(LogitsModel(4), policy, flops, batch_size=50, decide=decide).run(test), ref, flops
        )


def test_an_unknown_score_is_an_error_in_every_form():
    z = np.zeros((3, 4), dtype=np.float32)
    for call in (
        lambda: confidence(z, "logit"),
        lambda: torch_confidence(torch.as_tensor(z), "logit"),
        lambda: check_score("logit"),
        lambda: ScoreThreshold("logit", [0.5]),
    ):
        with pytest.raises(ValueError, match="unknown confidence score 'logit'"):
            call()
    policy = GapPolicy().fit(np.zeros((4, 2, 3), np.float32))
    policy.score = "logit"
    with pytest.raises(ValueError, match="unknown confidence score 'logit'"):
        EarlyExitRunner(LogitsModel(2), policy, np.ones(2))
    with pytest.raises(ValueError, match="unknown confidence score 'logit'"):
        AskPolicy(policy)


def test_every_score_has_both_forms_close_to_each_other():
    z = (np.random.default_rng(0).standard_normal((50, 7)) * 3).astype(np.float32)
    for score in SCORES:
        t = torch_confidence(torch.as_tensor(z), score).numpy()
        np.testing.assert_allclose(t, confidence(z, score), rtol=0, atol=1e-13)


def test_no_policy_name_or_class_in_the_runner():
    """The runner's modules read what a policy says about itself, never which policy it is."""
    names = [n for n in POLICY_NAMES]
    classes = [get_policy_class(n).__name__ for n in POLICY_NAMES]
    root = Path(__file__).resolve().parents[2] / "src" / "pcee"
    for path in [*(root / "inference").glob("*.py"), root / "latency.py"]:
        text = path.read_text()
        for cls in classes:
            assert not re.search(rf"\b{cls}\b", text), (path.name, cls)
        for name in names:
            assert f'"{name}"' not in text and f"'{name}'" not in text, (path.name, name)

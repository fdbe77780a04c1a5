"""The promotion gate (DESIGN.md §5): pure logic, no services."""

import pytest

from pcee.registry.gate import Evaluation, gate


def ev(acc, flops, version="2"):
    return Evaluation(version=version, accuracy=acc, mean_flops=flops, n=100)


def test_no_champion_promotes_when_target_met():
    d = gate(ev(0.95, 10.0), None, 0.9)
    assert d.promote and "no champion" in d.reason


def test_challenger_missing_target_is_rejected_even_without_champion():
    d = gate(ev(0.85, 1.0), None, 0.9)
    assert not d.promote and "misses the target" in d.reason


def test_cheaper_challenger_meeting_target_replaces_champion():
    assert gate(ev(0.92, 8.0), ev(0.95, 10.0, "1"), 0.9).promote


def test_equal_cost_is_allowed():
    assert gate(ev(0.92, 10.0), ev(0.95, 10.0, "1"), 0.9).promote


def test_costlier_challenger_is_rejected_when_champion_meets_target():
    d = gate(ev(0.99, 12.0), ev(0.91, 10.0, "1"), 0.9)
    assert not d.promote and "costs" in d.reason


def test_costlier_challenger_wins_when_champion_fails_target():
    d = gate(ev(0.91, 12.0), ev(0.85, 10.0, "1"), 0.9)
    assert d.promote and "champion accuracy" in d.reason


def test_cost_tolerance():
    assert gate(ev(0.95, 10.5), ev(0.95, 10.0, "1"), 0.9, cost_tolerance=0.06).promote
    assert not gate(ev(0.95, 10.5), ev(0.95, 10.0, "1"), 0.9, cost_tolerance=0.04).promote


@pytest.mark.parametrize("target", [-0.1, 1.5])
def test_bad_target_is_refused(target):
    with pytest.raises(ValueError, match="target_accuracy"):
        gate(ev(0.9, 1.0), None, target)


def test_markdown_names_decision_and_both_models():
    md = gate(ev(0.92, 8.0), ev(0.95, 10.0, "1"), 0.9).markdown()
    assert "PROMOTE" in md and "| challenger | 2 |" in md and "| champion | 1 |" in md


def test_the_bound_decides_not_the_point_accuracy():
    """With a bound, a challenger whose point accuracy meets the target but whose lower bound does not is rejected."""
    shaky = Evaluation(version="2", accuracy=0.93, mean_flops=5.0, n=100, accuracy_lower_bound=0.88, test_accuracy=0.99)
    d = gate(shaky, None, 0.9, bound="clopper-pearson", risk=0.1)
    assert not d.promote and "accuracy lower bound 0.8800 misses" in d.reason
    assert (
        "clopper-pearson lower bound at risk 0.1" in d.markdown()
        and "test accuracy (check, not used for choosing)" in d.markdown()
    )
    sure = Evaluation(version="2", accuracy=0.95, mean_flops=5.0, n=1000, accuracy_lower_bound=0.93, test_accuracy=0.5)
    assert gate(
        sure, None, 0.9, bound="clopper-pearson", risk=0.1
    ).promote  # a bad test figure cannot veto: it is a check


def test_point_mode_is_labelled():
    d = gate(ev(0.95, 10.0), None, 0.9)
    assert d.promote and "point estimate (no guarantee)" in d.markdown()


def test_cost_is_compared_in_time_when_both_carry_a_latency_profile():
    # fewer FLOPs but more time (early segments that are slow on this machine): time decides
    new = Evaluation(version="2", accuracy=0.95, mean_flops=3.0, n=100, mean_latency_s=2.0e-4)
    old = Evaluation(version="1", accuracy=0.95, mean_flops=5.0, n=100, mean_latency_s=1.5e-4)
    decision = gate(new, old, 0.9)
    assert not decision.promote and "ms per sample (latency profile)" in decision.reason
    assert "0.2000 > champion 0.1500" in decision.reason
    assert "| 0.2000 |" in decision.markdown()
    # one side without a profile: FLOPs, as before
    legacy = Evaluation(version="1", accuracy=0.95, mean_flops=5.0, n=100)
    assert gate(new, legacy, 0.9).promote and "FLOPs" in gate(new, legacy, 0.9).reason
    # profiles timed differently (a champion profiled before the runner method): FLOPs, and the reason says why
    runner = Evaluation(
        version="2", accuracy=0.95, mean_flops=3.0, n=100, mean_latency_s=2.0e-4, latency_method="runner"
    )
    segments = Evaluation(
        version="1", accuracy=0.95, mean_flops=5.0, n=100, mean_latency_s=1.5e-4, latency_method="segments"
    )
    mixed = gate(runner, segments, 0.9)
    assert mixed.promote and "FLOPs" in mixed.reason and "timed differently: runner vs segments" in mixed.reason
    assert not gate(runner, Evaluation(**{**vars(segments), "latency_method": "runner"}), 0.9).promote  # alike: time


def test_evaluate_bundle_reads_the_latency_profile(tmp_path):
    import numpy as np

    from pcee.latency import measure_exit_latency
    from pcee.registry.evaluate import evaluate_bundle
    from tests.serving.conftest import build_bundle

    bundle = build_bundle(tmp_path / "b")
    x = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    assert evaluate_bundle(bundle, x, np.zeros(20, dtype=np.int64)).mean_latency_s is None
    import json

    from pcee.bundle import ModelBundle

    model = ModelBundle.load(bundle).model
    profile = measure_exit_latency(model, (1, 8, 8), batch_sizes=(4,), repeats=2, warmup=0)
    meta = json.loads((bundle / "meta.json").read_text())
    (bundle / "meta.json").write_text(json.dumps({**meta, "latency_profile": profile.to_dict()}))
    ev = evaluate_bundle(bundle, x, np.zeros(20, dtype=np.int64))
    # a mean of per-exit costs lies within their range, up to the rounding of the mean (a mean of equal
    # floats can exceed them in the last bit)
    cost = profile.cost()
    assert ev.mean_latency_s is not None
    assert cost.min() * (1 - 1e-9) <= ev.mean_latency_s <= cost.max() * (1 + 1e-9)
    assert ev.latency_method == "runner"

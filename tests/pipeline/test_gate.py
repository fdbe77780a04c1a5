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

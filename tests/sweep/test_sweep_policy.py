"""sweep_policy for every registered policy on synthetic outputs; select_delta."""

from __future__ import annotations

import numpy as np
import pytest

from pcee.outputs import ExitOutputs
from pcee.policies.registry import POLICY_NAMES, build_policy
from pcee.sweep import select_delta, sweep_policy


def synthetic_outputs(n: int, seed: int, num_exits: int = 4, k: int = 5) -> ExitOutputs:
    """Later exits are more accurate and more confident when right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, num_exits, k)).astype(np.float32)
    for level in range(num_exits):
        strength = 0.8 + 0.9 * level
        logits[np.arange(n), level, labels] += rng.normal(strength, 1.0, n).astype(np.float32)
    flops = np.cumsum(np.linspace(1.0, 2.0, num_exits)) * 1e6
    return ExitOutputs(logits, labels.astype(np.int64), flops)


VAL, TEST = synthetic_outputs(1500, 0), synthetic_outputs(1500, 1)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_sweeps(name):
    res = sweep_policy(name, VAL, TEST)
    assert len(res) > 1
    assert res.exit_hist.shape == (len(res), TEST.num_exits)
    np.testing.assert_allclose(res.exit_hist.sum(axis=1), 1.0)
    assert np.all((res.relative_cost > 0) & (res.relative_cost <= 1 + 1e-12))
    rows = res.to_rows()
    assert {"policy", "delta", "accuracy", "mean_flops", "relative_cost", "shortfall"} <= set(rows[0])
    if name in ("pcee", "pcee-ws", "risk-controlled", "oracle", "threshold", "temperature"):
        assert np.all(np.isfinite(res.shortfall))
    else:
        assert np.all(np.isnan(res.shortfall))


@pytest.mark.parametrize("name", ["pcee", "pcee-ws"])
def test_closed_form_policy_sweep_equals_decide(name):
    grid = np.array([0.0, 0.3, 0.55, 0.8, 0.93, 1.0])
    res = sweep_policy(name, VAL, TEST, grid=grid, n_bins=10)
    correct = TEST.logits.argmax(-1) == TEST.labels[:, None]
    for i, d in enumerate(grid):
        policy = build_policy(name, delta=float(d), n_bins=10).fit(VAL.logits, VAL.labels, VAL.flops)
        exits = policy.decide(TEST.logits)
        assert res.accuracy[i] == pytest.approx(correct[np.arange(len(TEST)), exits].mean())
        assert res.mean_flops[i] == pytest.approx(TEST.flops[exits].mean())


def test_risk_controlled_sweep_equals_decide():
    grid = np.array([0.6, 0.8, 0.9])
    res = sweep_policy("risk-controlled", VAL, TEST, grid=grid)
    for i, a in enumerate(grid):
        policy = build_policy("risk-controlled", alpha=float(a)).fit(VAL.logits, VAL.labels, VAL.flops)
        exits = policy.decide(TEST.logits)
        assert res.mean_flops[i] == pytest.approx(TEST.flops[exits].mean())


def test_loop_policy_sweep_equals_decide():
    grid = np.array([0.3, 0.7])
    res = sweep_policy("eero", VAL, TEST, grid=grid)
    for i, b in enumerate(grid):
        exits = build_policy("eero", budget=float(b)).fit(VAL.logits, VAL.labels, VAL.flops).decide(TEST.logits)
        assert res.mean_flops[i] == pytest.approx(TEST.flops[exits].mean())


def test_oracle_is_cheapest_at_equal_accuracy():
    oracle = sweep_policy("oracle", VAL, TEST)
    for name in ("pcee", "pcee-ws", "threshold", "msdnet-budget"):
        res = sweep_policy(name, VAL, TEST)
        for acc, cost in zip(res.accuracy, res.mean_flops):
            # the oracle's cheapest cost for accuracy >= acc
            ok = oracle.accuracy >= acc - 1e-12
            if ok.any():
                assert oracle.mean_flops[ok].min() <= cost + 1e-6


def test_pcee_controls_accuracy_on_synthetic_data():
    res = sweep_policy("pcee-ws", VAL, TEST)
    from pcee.metrics import shortfall_summary

    assert shortfall_summary(res)["mean"] < 0.02


def test_select_delta():
    res = sweep_policy("pcee", VAL, TEST)
    row = select_delta(res, target_accuracy=0.8)
    assert row["met"] and row["accuracy"] >= 0.8
    assert row["mean_flops"] == pytest.approx(res.mean_flops[res.accuracy >= 0.8].min())
    budget = float(np.median(res.mean_flops))
    row = select_delta(res, flops_budget=budget)
    assert row["met"] and row["mean_flops"] <= budget
    assert row["accuracy"] == pytest.approx(res.accuracy[res.mean_flops <= budget].max())
    assert res.to_rows()[row["index"]]["delta"] == row["delta"]
    miss = select_delta(res, target_accuracy=1.01)
    assert not miss["met"] and miss["accuracy"] == pytest.approx(res.accuracy.max())
    with pytest.raises(ValueError, match="exactly one"):
        select_delta(res)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown policy"):
        sweep_policy("nope", VAL, TEST)
    with pytest.raises(ValueError, match="swept parameter"):
        sweep_policy("pcee", VAL, TEST, delta=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep_policy("pcee", VAL, TEST, grid=[0.5, 1.5])


def test_csv(tmp_path):
    import pandas as pd

    res = sweep_policy("eero", VAL, TEST, grid=[0.5, 0.9])
    path = res.to_csv(tmp_path / "s.csv")
    df = pd.read_csv(path)
    assert list(df.columns[:7]) == [
        "policy",
        "param_name",
        "delta",
        "accuracy",
        "mean_flops",
        "relative_cost",
        "shortfall",
    ]
    assert df["param_name"].eq("budget").all() and df["shortfall"].isna().all()
    np.testing.assert_allclose(df["accuracy"], res.accuracy)
    assert [c for c in df.columns if c.startswith("exit_")] == [f"exit_{i}" for i in range(1, 5)]

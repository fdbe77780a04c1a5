"""The closed-form δ sweep equals a brute-force loop over δ (PCEE's rule applied δ by δ)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pcee.sweep import default_delta_grid, oracle_curve, sweep_delta_closed_form, sweep_exits


def brute_force(map_values, correct, flops, deltas):
    n, num_exits = correct.shape
    acc, cost, hist = [], [], []
    for d in deltas:
        exits = np.full(n, num_exits - 1)
        for i in range(n):
            for level in range(num_exits - 1):
                if map_values[i, level] >= d:  # NaN never passes
                    exits[i] = level
                    break
        acc.append(correct[np.arange(n), exits].mean())
        cost.append(flops[exits].mean())
        hist.append(np.bincount(exits, minlength=num_exits) / n)
    return np.array(acc), np.array(cost), np.array(hist)


# map values on a coarse lattice so that ties between exits and samples are common, and the δ
# grid includes the lattice itself (δ exactly at a map value)
LATTICE = np.round(np.linspace(0, 1, 11), 10)


@st.composite
def sweep_case(draw):
    n = draw(st.integers(1, 30))
    num_exits = draw(st.integers(1, 5))
    idx = draw(arrays(np.int64, (n, num_exits - 1), elements=st.integers(0, 10)))
    mv = LATTICE[idx]
    if draw(st.booleans()) and mv.size:
        nan_mask = draw(arrays(np.bool_, mv.shape))
        mv = np.where(nan_mask, np.nan, mv)
    correct = draw(arrays(np.bool_, (n, num_exits)))
    flops = np.cumsum(draw(arrays(np.float64, num_exits, elements=st.floats(0.5, 10))))
    extra = draw(st.lists(st.floats(-0.5, 1.5, allow_nan=False), max_size=5))
    deltas = np.concatenate([LATTICE, np.array(extra), [np.inf, -np.inf]])
    draw(st.randoms()).shuffle(deltas)  # unsorted grid
    return mv, correct, flops, deltas


@settings(max_examples=150, deadline=None)
@given(sweep_case())
def test_closed_form_equals_brute_force(case):
    mv, correct, flops, deltas = case
    res = sweep_delta_closed_form(mv, correct, flops, deltas)
    acc, cost, hist = brute_force(mv, correct, flops, deltas)
    np.testing.assert_allclose(res.accuracy, acc, atol=1e-12)
    np.testing.assert_allclose(res.mean_flops, cost, rtol=1e-12)
    np.testing.assert_allclose(res.exit_hist, hist, atol=1e-12)
    np.testing.assert_allclose(res.relative_cost, cost / flops[-1], rtol=1e-12)
    np.testing.assert_allclose(res.exit_hist.sum(axis=1), 1.0)
    np.testing.assert_array_equal(res.delta, deltas)


def test_closed_form_on_large_random_data_matches_loop_path():
    rng = np.random.default_rng(0)
    n, num_exits = 2000, 6
    mv = rng.random((n, num_exits - 1))
    correct = rng.random((n, num_exits)) < np.linspace(0.4, 0.9, num_exits)
    flops = np.cumsum(rng.uniform(1, 3, num_exits))
    deltas = default_delta_grid()
    res = sweep_delta_closed_form(mv, correct, flops, deltas)
    from pcee.policies.estimator import first_passing_exit

    exits = np.stack([first_passing_exit(mv >= d) for d in deltas])
    loop = sweep_exits("pcee", "delta", deltas, exits, correct, flops)
    np.testing.assert_allclose(res.accuracy, loop.accuracy)
    np.testing.assert_allclose(res.mean_flops, loop.mean_flops)
    np.testing.assert_allclose(res.exit_hist, loop.exit_hist)
    np.testing.assert_allclose(res.shortfall, np.maximum(0, deltas - loop.accuracy))


def test_hand_case():
    # sample 0: maps (0.3, 0.8): exit 0 for δ<=0.3, exit 1 for 0.3<δ<=0.8, exit 2 above
    # sample 1: maps (0.9, 0.5): running max 0.9 -> exit 0 for δ<=0.9, else exit 2
    mv = np.array([[0.3, 0.8], [0.9, 0.5]])
    correct = np.array([[False, True, True], [True, True, False]])
    flops = np.array([1.0, 2.0, 4.0])
    res = sweep_delta_closed_form(mv, correct, flops, [0.3, 0.5, 0.8, 0.9, 0.95])
    np.testing.assert_allclose(res.accuracy, [0.5, 1.0, 1.0, 1.0, 0.5])
    np.testing.assert_allclose(res.mean_flops, [1.0, 1.5, 1.5, 2.5, 4.0])
    np.testing.assert_allclose(res.exit_hist[2], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(res.shortfall, [0, 0, 0, 0, 0.45])
    assert res.final_accuracy == 0.5
    np.testing.assert_array_equal(res.achievable, [True, True, False, False, False])


def test_single_exit_model():
    correct = np.array([[True], [False]])
    res = sweep_delta_closed_form(np.zeros((2, 0)), correct, np.array([3.0]), [0.0, 1.0])
    np.testing.assert_allclose(res.accuracy, 0.5)
    np.testing.assert_allclose(res.relative_cost, 1.0)


def test_bad_shapes_raise():
    import pytest

    with pytest.raises(ValueError, match="map_values"):
        sweep_delta_closed_form(np.zeros((3, 1)), np.zeros((3, 3), bool), np.ones(3), [0.5])
    with pytest.raises(ValueError, match="flops"):
        sweep_delta_closed_form(np.zeros((3, 2)), np.zeros((3, 3), bool), np.ones(2), [0.5])


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 25), st.integers(1, 4))), st.data())
def test_oracle_curve_is_cheapest(correct, data):
    """The cost-capped oracle reaches every target up to its accuracy, and no assignment of exits
    reaching the same number of correct answers is cheaper (checked exhaustively on tiny cases)."""
    n, num_exits = correct.shape
    flops = np.cumsum(data.draw(arrays(np.float64, num_exits, elements=st.floats(0.5, 5))))
    targets = np.arange(n + 1) / n
    res = oracle_curve(correct, flops, targets)
    best = correct.any(axis=1).mean()
    assert np.all(res.accuracy >= np.minimum(targets, best) - 1e-12)
    # cheapest cost for k correct: take exit 1 everywhere, then the cheapest first-correct exits
    first = np.where(correct.any(axis=1), np.argmax(correct, axis=1), 0)
    fix = np.sort(flops[first[correct.any(axis=1) & ~correct[:, 0]]])
    base = correct[:, 0].sum()
    for j, t in enumerate(targets):
        k = max(0, int(np.ceil(t * n - 1e-9)) - base)
        k = min(k, fix.size)
        expected = (flops[0] * (n - k) + fix[:k].sum()) / n
        assert res.mean_flops[j] == np.float64(expected) or abs(res.mean_flops[j] - expected) < 1e-9
    np.testing.assert_allclose(res.exit_hist.sum(axis=1), 1.0)

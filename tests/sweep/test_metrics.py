"""Metrics against sklearn and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import roc_auc_score

from pcee import metrics as M


@settings(max_examples=100, deadline=None)
@given(
    st.integers(2, 60).flatmap(
        lambda n: st.tuples(
            arrays(np.float64, n, elements=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0])), arrays(np.bool_, n)
        )
    )
)
def test_auroc_equals_sklearn(case):
    s, c = case
    got = M.failure_auroc(s, c)
    if c.all() or not c.any():
        assert np.isnan(got)
    else:
        assert got == pytest.approx(roc_auc_score(c, s), abs=1e-12)


def test_ece_hand_computation():
    # 15 bins of width 1/15: 0.05 -> bin 0; 0.5 -> bin 7; 0.52 -> bin 7; 0.95 and 1.0 -> bin 14
    conf = np.array([0.05, 0.5, 0.52, 0.95, 1.0])
    correct = np.array([0, 1, 0, 1, 1], bool)
    # bin 0: |0 - 0.05| * 1/5; bin 7: |0.5 - 0.51| * 2/5; bin 14: |1 - 0.975| * 2/5
    expected = 0.05 / 5 + 0.01 * 2 / 5 + 0.025 * 2 / 5
    assert M.expected_calibration_error(conf, correct) == pytest.approx(expected, abs=1e-12)
    # a bin edge: s = 1/15 exactly belongs to bin 1 (floor), perfect calibration gives 0 only per bin
    assert M.expected_calibration_error([1 / 15, 1 / 15], [True, False], n_bins=15) == pytest.approx(abs(0.5 - 1 / 15))


def test_ece_of_perfectly_calibrated_bins_is_zero():
    conf = np.repeat([0.25, 0.75], 4)
    correct = np.array([1, 0, 0, 0, 1, 1, 1, 0], bool)
    assert M.expected_calibration_error(conf, correct, n_bins=10) == pytest.approx(0.0)


def test_aurc_hand_case():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 0, 1, 0], bool)
    # risks at coverage 1..4: 0, 1/2, 1/3, 2/4
    assert M.aurc(conf, correct) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    # perfect ranking: all correct first
    assert M.aurc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)


def test_aurc_ties_are_order_independent():
    conf = np.array([0.5, 0.5, 0.5, 0.9])
    a = M.aurc(conf, [True, False, True, True])
    b = M.aurc(conf, [False, True, True, True])
    # coverage 1: risk 0 (0.9 correct); coverages 2..4 share the tie group's risk 1/4
    assert a == b == pytest.approx((0 + 3 * 0.25) / 4)


def test_accuracy_and_flops():
    flops = np.array([1.0, 2.0, 4.0])
    assert M.accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
    assert M.mean_flops([0, 2, 2, 1], flops) == pytest.approx(11 / 4)
    with pytest.raises(ValueError, match="equal shape"):
        M.accuracy([1, 2], [1])


def test_oracle_area_gap():
    oc, oa = np.array([0.2, 0.5, 1.0]), np.array([0.6, 0.9, 0.9])
    assert M.oracle_area_gap(oc, oa, oc, oa) == pytest.approx(0.0)
    # a policy 0.1 below the oracle everywhere on the same costs
    assert M.oracle_area_gap(oc, oa - 0.1, oc, oa) == pytest.approx(0.1)
    # a policy that only has the final point (cost 1, acc 0.9) from cost 1: range [1, 1] -> 0 gap there
    assert M.oracle_area_gap([1.0], [0.9], oc, oa) == pytest.approx(0.0)
    # hand trapezoid: policy (0.2, 0.5) -> (1.0, 0.9) vs oracle above: gap 0.1 at 0.2, 0.4 - 0.15 = 0.25 at 0.5, 0 at 1
    gap = M.oracle_area_gap([0.2, 1.0], [0.5, 0.9], oc, oa)
    expected = (0.5 * (0.1 + 0.25) * 0.3 + 0.5 * (0.25 + 0.0) * 0.5) / 0.8
    assert gap == pytest.approx(expected)


def test_shortfall_summary():
    from pcee.sweep import sweep_delta_closed_form

    mv = np.array([[0.3, 0.8], [0.9, 0.5]])
    correct = np.array([[False, True, True], [True, True, False]])
    res = sweep_delta_closed_form(mv, correct, np.array([1.0, 2.0, 4.0]), [0.3, 0.5, 0.8, 0.9, 0.95])
    s = M.shortfall_summary(res)  # achievable: δ <= 0.5 (final-exit accuracy)
    assert s == {"mean": 0.0, "max": 0.0, "n": 2}
    assert M.shortfall_summary(res, min_delta=0.8)["n"] == 0

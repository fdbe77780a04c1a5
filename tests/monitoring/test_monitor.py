"""Drift monitor on synthetic windows: clean windows rarely alarm, shifted windows do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monitoring.monitor import DriftMonitor
from monitoring.reference import reference_from_logits
from pcee.policies.pcee import PCEEPolicy
from tests.synthetic import make_outputs

WINDOW = 200


@pytest.fixture(scope="module")
def setup():
    val_logits, val_labels, flops = make_outputs(1500, seed=0)
    policy = PCEEPolicy(delta=0.85).fit(val_logits, val_labels, flops)
    ref_conf, ref_exits = reference_from_logits(val_logits, policy)
    return policy, DriftMonitor(ref_conf, ref_exits)


def _window(policy, seed, **kwargs):
    logits, _, _ = make_outputs(WINDOW, seed=seed, **kwargs)
    return reference_from_logits(logits, policy)  # what the service logs: NaN after the exit


def test_reference_hides_exits_not_computed(setup):
    policy, monitor = setup
    conf, exits = monitor.reference_confidences, monitor.reference_exits
    assert np.isfinite(conf[:, 0]).all()
    for level in range(conf.shape[1]):
        assert np.array_equal(np.isfinite(conf[:, level]), exits >= level)


def test_twenty_clean_windows_at_most_one_false_alarm(setup):
    policy, monitor = setup
    alarms = [monitor.check(*_window(policy, seed=100 + i)).drifted for i in range(20)]
    assert sum(alarms) <= 1


def test_shifted_window_drifts_and_reports(setup, tmp_path):
    policy, monitor = setup
    # a corruption lowers early exits' confidence (Beta shapes shifted towards 0.5)
    conf, exits = _window(policy, seed=7, shapes=((2.0, 1.5), (3.0, 1.5), (9.0, 1.0)))
    report = monitor.check(conf, exits, window={"start": "2026-01-01T00:00:00", "end": "2026-01-01T00:01:00"})
    assert report.drifted
    assert report.primary.p_value < report.primary.threshold
    assert report.columns[0].column == "exit_0" and report.columns[0].drifted
    assert report.columns[0].threshold == pytest.approx(0.01 / len(report.columns))
    assert sum(report.exit_hist_live) == pytest.approx(1.0, abs=1e-5)
    json_path, html_path = report.write(tmp_path, "window-0001")
    summary = json.loads(json_path.read_text())
    assert summary["drifted"] is True
    assert summary["window"]["start"] == "2026-01-01T00:00:00"
    assert summary["evidently"]["tests"]  # Evidently's own test results are kept
    assert "<html" in html_path.read_text()[:2000].lower()


def test_small_window_is_untested(setup):
    policy, monitor = setup
    conf, exits = _window(policy, seed=8, shapes=((2.0, 1.5), (3.0, 1.5), (9.0, 1.0)))
    report = monitor.check(conf[:10], exits[:10])
    assert not report.drifted and report.columns == []


def test_bad_configuration_is_rejected(setup):
    _, monitor = setup
    with pytest.raises(ValueError, match="valid choices: ks"):
        DriftMonitor(monitor.reference_confidences, monitor.reference_exits, method="psi")
    with pytest.raises(ValueError, match="alpha"):
        DriftMonitor(monitor.reference_confidences, monitor.reference_exits, alpha=0.0)
    with pytest.raises(ValueError, match="exits must be"):
        monitor.check(monitor.reference_confidences[:100], monitor.reference_exits[:50])


def test_statistic_and_p_value_are_scipy_ks_2samp(setup):
    """Evidently's "ks" p-value (and the reported D) are scipy's two-sample KS on each column's computed values."""
    from scipy.stats import ks_2samp

    policy, monitor = setup
    for conf, exits in (
        _window(policy, seed=7, shapes=((2.0, 1.5), (3.0, 1.5), (9.0, 1.0))),
        _window(policy, seed=100),
    ):
        report = monitor.check(conf, exits)
        evidently_scores = {m["config"]["column"]: m["value"] for m in report.snapshot.dict()["metrics"]}
        assert [c.column for c in report.columns] == ["exit_0", "exit_1", "exit_2"]
        for level, col in enumerate(report.columns):
            a, b = monitor.reference_confidences[:, level], conf[:, level]
            expected = ks_2samp(a[np.isfinite(a)], b[np.isfinite(b)])
            assert col.statistic == pytest.approx(expected.statistic, rel=1e-12, abs=0)
            assert col.p_value == pytest.approx(expected.pvalue, rel=1e-12, abs=0)
            assert col.p_value == evidently_scores[col.column]  # the JSON report's Evidently value
            assert col.drifted == (expected.pvalue <= col.threshold)
            assert (col.n_reference, col.n_live) == (int(np.isfinite(a).sum()), int(np.isfinite(b).sum()))
        assert report.exit_hist_p_value == evidently_scores["exit"]


def test_p_value_matches_ks_2samp_on_a_plain_sample():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(3)
    ref, live = rng.beta(5.0, 1.5, size=(800, 1)), rng.beta(4.0, 1.5, size=(300, 1))
    monitor = DriftMonitor(ref, np.zeros(800, dtype=np.int64))
    column = monitor.check(live, np.zeros(300, dtype=np.int64)).columns[0]
    expected = ks_2samp(ref[:, 0], live[:, 0])
    assert (column.statistic, column.p_value) == (
        pytest.approx(expected.statistic, rel=1e-12),
        pytest.approx(expected.pvalue, rel=1e-12),
    )
    assert column.drifted == (expected.pvalue <= 0.01)

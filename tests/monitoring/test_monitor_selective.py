"""The monitor carries each window's selective answering: requests answered, abstained, deferred,
deferral_failed, coverage, and accuracy on answered requests (measured on the labelled answered
rows, estimated as their mean expected accuracy) — in the report (dict, JSON, HTML), the drift
event's payload, and the ``monitor`` flow's return value, MLflow metrics and Prefect artifact.
The drift alarm itself does not depend on it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from monitoring.events import drift_payload
from monitoring.monitor import DriftMonitor
from monitoring.reference import reference_from_logits
from pcee.policies.pcee import PCEEPolicy
from pcee.selective import SelectiveSummary
from pcee.settings import Settings
from tests.monitoring.conftest import load_flow_module
from tests.records import request_record
from tests.synthetic import make_outputs

NAME = "pcee-test-selective"


@pytest.fixture(scope="module")
def reference():
    val_logits, val_labels, flops = make_outputs(1000, seed=0)
    policy = PCEEPolicy(delta=0.85).fit(val_logits, val_labels, flops)
    return reference_from_logits(val_logits, policy)


def _live(n: int, seed: int, low: bool):
    """(n, 1) first-exit confidences: drawn from well below the reference (``low``) or from it."""
    rng = np.random.default_rng(seed)
    c0 = rng.uniform(0.15, 0.35, n) if low else rng.beta(4.0, 1.5, n).clip(0.11, 0.999)
    return c0[:, None], np.zeros(n, dtype=np.int64)


SUMMARY = SelectiveSummary(
    n=60,
    answered=40,
    abstained=12,
    deferred=6,
    deferral_failed=2,
    coverage=40 / 60,
    answered_accuracy_estimated=0.85,
    n_labelled_answered=10,
    answered_accuracy_measured=0.7,
)


# -- the report and the event payload (no services) ---------------------------------------------


def test_report_carries_the_summary_in_dict_json_and_html(reference, tmp_path):
    monitor = DriftMonitor(*reference)
    conf, exits = _live(60, seed=1, low=True)
    plain = monitor.check(conf, exits, window={"n": 60})
    report = monitor.check(conf, exits, window={"n": 60}, selective=SUMMARY)
    assert plain.selective is None and plain.to_dict()["selective"] is None
    # the alarm is the KS test alone: the same with and without the summary
    assert report.drifted == plain.drifted is True
    assert [c.p_value for c in report.columns] == [c.p_value for c in plain.columns]
    assert report.to_dict()["selective"] == SUMMARY.to_dict()

    json_path, html_path = report.write(tmp_path, "w")
    sel = json.loads(json_path.read_text())["selective"]
    assert (sel["n"], sel["answered"], sel["abstained"], sel["deferred"], sel["deferral_failed"]) == (60, 40, 12, 6, 2)
    assert sel["coverage"] == pytest.approx(2 / 3)
    assert sel["answered_accuracy_measured"] == 0.7 and sel["n_labelled_answered"] == 10
    html = html_path.read_text()
    assert "pcee-selective" in html and html.lower().index("<body") < html.index("pcee-selective")
    assert "measured (on 10 labelled answered requests)" in html and "<td>0.7000</td>" in html
    assert "estimated (mean expected accuracy" in html and "<td>0.8500</td>" in html
    assert "<td>0.6667</td>" in html  # coverage


def test_small_window_and_dict_summary(reference, tmp_path):
    """An untested (too small) window still reports its summary; a dict is accepted, NaN becomes None."""
    conf, exits = _live(10, seed=2, low=True)
    given = {**SUMMARY.to_dict(), "answered_accuracy_measured": float("nan"), "n_labelled_answered": 0}
    report = DriftMonitor(*reference).check(conf, exits, selective=given)
    assert not report.drifted and report.columns == []
    assert report.selective["answered_accuracy_measured"] is None
    json_path, html_path = report.write(tmp_path, "small")
    assert json.loads(json_path.read_text())["selective"]["answered_accuracy_measured"] is None
    html = html_path.read_text()
    assert "window too small" in html and "measured (on 0 labelled answered requests)" in html


def test_drift_payload_carries_coverage_and_accuracy(reference):
    monitor = DriftMonitor(*reference)
    conf, exits = _live(60, seed=3, low=True)
    payload = drift_payload(monitor.check(conf, exits, {"start": "a", "end": "b"}, selective=SUMMARY), "m", 3)
    assert payload["coverage"] == pytest.approx(2 / 3)
    assert payload["answered_accuracy_measured"] == 0.7 and payload["n_labelled_answered"] == 10
    assert payload["answered_accuracy_estimated"] == 0.85
    assert payload["selective"]["deferred"] == 6
    json.dumps(payload)  # an event payload must be JSON
    bare = drift_payload(monitor.check(conf, exits, {"start": "a", "end": "b"}), "m", 3)
    assert bare["coverage"] is None and bare["selective"] is None


# -- the monitor flow on a real traffic store, MLflow and Prefect server -------------------------


@pytest.fixture()
def flow_env(prefect_server, reference, tmp_path, monkeypatch):
    """The monitor flow with a real traffic store (SQLite), MLflow (SQLite) and Prefect server; the
    registry look-ups (champion alias, bundle, reference) are replaced by the synthetic reference."""
    for key, value in {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PCEE_TRAFFIC_URL": f"sqlite:///{tmp_path / 'traffic.db'}",
        "PCEE_STATE_DIR": str(tmp_path / "state"),
        "PREFECT_API_URL": prefect_server,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    module = load_flow_module("monitor")
    champion = {"version": "1"}
    monkeypatch.setattr(module.R, "read_aliases", lambda name: {"champion": champion["version"], "challenger": None})
    monkeypatch.setattr(module.R, "fetch_bundle", lambda name, version, dst: str(tmp_path))
    monkeypatch.setattr(module, "load_reference", lambda bundle_dir: reference)
    (tmp_path / "meta.json").write_text("{}")  # a certified champion's meta: it waits for no labels
    events = []

    def emit(model_name, payload):
        events.append(payload)
        return f"event-{len(events)}"

    monkeypatch.setattr(module, "emit_drift_event", emit)  # the name the flow calls
    return {"module": module, "champion": champion, "events": events}


def _log(version: str, decisions, expected, conf, start: datetime, predictions=None, fallback=None):
    """Hand-logged requests, 1 ms apart from ``start``; returns their ids."""
    from pcee.traffic.store import TrafficStore

    n = len(decisions)
    predictions = [1] * n if predictions is None else predictions
    records = [
        request_record(
            time=start + timedelta(milliseconds=i),
            model_version=version,
            delta=0.85,
            prediction=int(predictions[i]),
            confidence=float(conf[i, 0]),
            expected_accuracy=float(expected[i]),
            confidences=[float(conf[i, 0])],
            decision=decisions[i],
            answer_threshold=0.5,
            fallback_prediction=None if fallback is None else fallback[i],
        )
        for i in range(n)
    ]
    store = TrafficStore.from_settings(Settings())
    store.log_requests(records)
    store.dispose()
    return [r.id for r in records]


def _feedback(pairs) -> None:
    from pcee.traffic.store import TrafficStore

    store = TrafficStore.from_settings(Settings())
    for rid, label in pairs:
        store.add_feedback(rid, int(label))
    store.dispose()


def _mlflow_metrics(run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    from pcee.registry.tracking import tracking_uri

    return MlflowClient(tracking_uri()).get_run(run_id).data.metrics


def _artifact_markdown() -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"pcee-drift-{NAME}"]))
        )
    return artifact.data


@pytest.mark.integration
def test_flow_reports_mixed_decisions_with_feedback(flow_env):
    now = datetime.now(UTC)
    conf, _ = _live(60, seed=4, low=True)
    # outside the window: an older version-1 row set (the count window is the last 60) and another version
    _log("1", ["abstained"] * 10, [0.2] * 10, conf[:10], now - timedelta(minutes=5))
    _log("0", ["answered"] * 20, [0.99] * 20, conf[:20], now - timedelta(seconds=30))
    decisions = ["answered"] * 40 + ["abstained"] * 12 + ["deferred"] * 6 + ["deferral_failed"] * 2
    expected = [0.8] * 20 + [0.9] * 20 + [0.3] * 20
    predictions = [1] * 60
    ids = _log(
        "1",
        decisions,
        expected,
        conf,
        now - timedelta(seconds=10),
        predictions=predictions,
        fallback=[None] * 52 + [2] * 6 + [None] * 2,
    )
    # 10 labelled answered rows, 7 right; labelled declined rows (all right) must not enter the measure
    labels = [(ids[i], 1 if i < 7 else 3) for i in range(10)]
    labels += [(ids[i], 1) for i in range(40, 45)] + [(ids[i], 2) for i in range(52, 58)]
    _feedback(labels)

    result = flow_env["module"].monitor(model_name=NAME, window=60)
    assert result["status"] == "drift" and result["n_live"] == 60
    sel = result["selective"]
    assert (sel["n"], sel["answered"], sel["abstained"], sel["deferred"], sel["deferral_failed"]) == (60, 40, 12, 6, 2)
    assert sel["coverage"] == pytest.approx(40 / 60)
    assert sel["n_labelled_answered"] == 10 and sel["answered_accuracy_measured"] == pytest.approx(0.7)
    assert sel["answered_accuracy_estimated"] == pytest.approx(0.85)

    with open(result["report_json"]) as fh:
        assert json.load(fh)["selective"] == sel
    with open(result["report_html"]) as fh:
        html = fh.read()
    assert "measured (on 10 labelled answered requests)" in html and "<td>0.7000</td>" in html
    assert "<td>0.6667</td>" in html and "<td>0.8500</td>" in html

    (payload,) = flow_env["events"]
    assert payload["coverage"] == pytest.approx(40 / 60) and payload["answered_accuracy_measured"] == pytest.approx(0.7)
    assert payload["answered_accuracy_estimated"] == pytest.approx(0.85) and payload["selective"] == sel

    metrics = _mlflow_metrics(result["mlflow_run_id"])
    assert metrics["coverage"] == pytest.approx(40 / 60)
    assert (metrics["abstained"], metrics["deferred"], metrics["deferral_failed"]) == (12, 6, 2)
    assert metrics["answered_accuracy_measured"] == pytest.approx(0.7) and metrics["n_labelled_answered"] == 10
    assert metrics["answered_accuracy_estimated"] == pytest.approx(0.85)

    md = _artifact_markdown()
    assert "selective answering" in md and "| 60 | 40 | 12 | 6 | 2 | 0.6667 | 0.7000 (10) | 0.8500 |" in md


@pytest.mark.integration
def test_flow_window_without_labels_has_no_measured_accuracy(flow_env, reference):
    flow_env["champion"]["version"] = "2"
    now = datetime.now(UTC)
    conf, _ = _live(60, seed=5, low=False)
    decisions = ["answered"] * 45 + ["abstained"] * 15
    expected = list(np.linspace(0.7, 0.9, 45)) + [0.4] * 15
    _log("2", decisions, expected, conf, now - timedelta(seconds=5))

    result = flow_env["module"].monitor(model_name=NAME, window=200, window_minutes=2.0)
    assert result["window"]["kind"] == "time" and result["n_live"] == 60
    sel = result["selective"]
    assert (sel["n"], sel["answered"], sel["abstained"], sel["deferred"]) == (60, 45, 15, 0)
    assert sel["coverage"] == pytest.approx(0.75)
    assert sel["answered_accuracy_measured"] is None and sel["n_labelled_answered"] == 0
    assert sel["answered_accuracy_estimated"] == pytest.approx(0.8)
    with open(result["report_html"]) as fh:
        html = fh.read()
    assert "measured (on 0 labelled answered requests)" in html and "<td>-</td>" in html
    metrics = _mlflow_metrics(result["mlflow_run_id"])
    assert "answered_accuracy_measured" not in metrics and metrics["n_labelled_answered"] == 0
    assert metrics["coverage"] == pytest.approx(0.75) and metrics["answered_accuracy_estimated"] == pytest.approx(0.8)
    assert "| 60 | 45 | 15 | 0 | 0 | 0.7500 | - (0) | 0.8000 |" in _artifact_markdown()

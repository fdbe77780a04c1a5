"""Integration: a drift event reaches a real Prefect server and its automation starts
``recalibrate/drift-alert`` with the event's window as parameters."""

from __future__ import annotations

import time

import pytest

from monitoring.events import DRIFT_EVENT, LABELS_EVENT, drift_payload, emit_drift_event
from monitoring.monitor import DriftMonitor
from monitoring.reference import reference_from_logits
from pcee.policies.pcee import PCEEPolicy
from tests.monitoring.conftest import load_flow_module
from tests.synthetic import make_outputs

pytestmark = pytest.mark.integration


def _drift_report():
    val_logits, val_labels, flops = make_outputs(1000, seed=0)
    policy = PCEEPolicy(delta=0.85).fit(val_logits, val_labels, flops)
    monitor = DriftMonitor(*reference_from_logits(val_logits, policy))
    live_logits, _, _ = make_outputs(200, seed=1, shapes=((2.0, 1.5), (3.0, 1.5), (9.0, 1.0)))
    report = monitor.check(
        *reference_from_logits(live_logits, policy),
        window={"start": "2026-01-01T00:00:00+00:00", "end": "2026-01-01T00:05:00+00:00"},
    )
    assert report.drifted
    return report


def test_drift_event_triggers_recalibrate_deployment(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    module = load_flow_module("recalibrate")
    (deployment,) = module.deployments()
    assert deployment.name == "drift-alert" and deployment.flow_name == "recalibrate"
    deployment_id = deployment.apply()  # registers the deployment and creates its automation

    with get_client(sync_client=True) as client:
        automations = client.read_automations_by_name("recalibrate-on-drift")
        assert automations and automations[0].trigger.expect == {DRIFT_EVENT}
        labels = client.read_automations_by_name("certify-on-labels")  # the few-label step's trigger
        assert labels and labels[0].trigger.expect == {LABELS_EVENT}
        time.sleep(15)  # let the triggers service load the new automation (5 s was too short on a loaded machine)

        payload = drift_payload(_drift_report(), "pcee-test-model", "7")
        event_id = emit_drift_event("pcee-test-model", payload)
        assert event_id

        runs = []
        deadline = time.time() + 150
        while time.time() < deadline and not runs:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
            time.sleep(1)
    assert len(runs) == 1, "the automation did not start recalibrate/drift-alert"
    params = runs[0].parameters
    assert params["model_name"] == "pcee-test-model"
    assert params["model_version"] == "7"
    assert params["window_start"] == "2026-01-01T00:00:00+00:00"

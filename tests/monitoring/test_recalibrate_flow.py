"""Integration: the ``recalibrate`` flow against a real MLflow store, traffic store and Prefect server.

- too few labels → recorded, nothing registered, champion unchanged;
- killed at the last moment (SIGKILL just before the alias move) → champion unchanged;
- a certified champion (its ``target_accuracy`` tag) → the refit's threshold is certified again on
  held-out rows, and the new version carries that certificate (tags, bundle meta).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import numpy as np
import pytest

from pcee.settings import Settings
from tests.monitoring.conftest import load_flow_module

pytestmark = pytest.mark.integration
NAME = "pcee-test-recal"


@pytest.fixture()
def services(prefect_server, tmp_path, monkeypatch):
    """MLflow (sqlite store) with v1 as champion, an empty traffic store, and a model for its inputs."""
    import torch

    from pcee.bundle import ModelBundle
    from pcee.models.registry import build_model
    from pcee.outputs import ExitOutputs
    from pcee.policies.pcee import PCEEPolicy
    from pcee.registry import aliases, log_and_register, promote
    from pcee.training.evaluate import predict_all_exits

    torch.set_num_threads(1)
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PCEE_TRAFFIC_URL": f"sqlite:///{tmp_path / 'traffic.db'}",
        "PCEE_STATE_DIR": str(tmp_path / "state"),
        "PREFECT_API_URL": prefect_server,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) stays in tmp
    torch.manual_seed(0)
    model = build_model("small-cnn").eval()
    rng = np.random.default_rng(0)
    x_val = rng.random((300, 1, 8, 8), dtype=np.float32)
    logits = predict_all_exits(model, x_val)
    # Maps fit on labels that agree with the first exit: they over-trust exit 0, as a shift would.
    labels = logits[:, 0].argmax(-1)
    flops = np.arange(1, model.num_exits + 1, dtype=np.float64) * 1e5
    policy = PCEEPolicy(delta=0.9).fit(logits, labels, flops)
    bundle_dir = ModelBundle(model, policy, flops, {"data": "synthetic"}).save(
        tmp_path / "bundle", reference=ExitOutputs(logits, labels, flops)
    )
    _, version = log_and_register(
        experiment="pcee-test", run_name="v1", model_name=NAME, bundle_dir=bundle_dir, params={}, metrics={}, tags={}
    )
    promote(NAME, version)
    assert aliases(NAME)["champion"] == version
    return {"env": env, "model": model, "version": version, "tmp": tmp_path}


def _log_traffic(model, n: int, seed: int) -> None:
    """n answered requests with stored inputs and feedback (labels = the final exit's predictions)."""
    from pcee.traffic.store import RequestRecord, TrafficStore, new_request_id
    from pcee.training.evaluate import predict_all_exits

    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 8, 8), dtype=np.float32)
    final = predict_all_exits(model, x)[:, -1].argmax(-1)
    store = TrafficStore.from_settings(Settings())
    records = [
        RequestRecord(
            id=new_request_id(),
            time=datetime.now(UTC),
            model_version="1",
            delta=0.9,
            policy="pcee",
            exit=0,
            prediction=0,
            confidence=0.5,
            expected_accuracy=0.9,
            confidences=[0.5],
            flops=1.0,
            latency_ms=1.0,
            input=x[i],
        )
        for i in range(n)
    ]
    store.log_requests(records)
    for r, y in zip(records, final):
        store.add_feedback(r.id, int(y))
    store.dispose()


def _versions(name: str) -> list[str]:
    from pcee.registry.tracking import client

    return sorted(str(mv.version) for mv in client().search_model_versions(f"name='{name}'"))


def test_too_few_labels_changes_nothing(services):
    from pcee.registry import aliases

    _log_traffic(services["model"], 5, seed=1)
    module = load_flow_module("recalibrate")
    result = module.recalibrate(model_name=NAME, min_labels=50)
    assert result["status"] == "too_few_labels" and result["n_labels"] == 5
    assert aliases(NAME)["champion"] == services["version"]
    assert _versions(NAME) == [services["version"]]


def test_killed_before_alias_move_leaves_champion(services):
    from pcee.registry import aliases

    _log_traffic(services["model"], 200, seed=2)
    script = textwrap.dedent(f"""
        import os, signal
        import flows.recalibrate as module
        def killed(*args, **kwargs):  # the process dies right before the alias move
            os.kill(os.getpid(), signal.SIGKILL)
        module.R.promote = killed
        module.recalibrate(model_name={NAME!r}, min_labels=50)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **services["env"]},
        cwd=services["tmp"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
    versions = _versions(NAME)
    assert len(versions) == 2  # the recalibrated version was registered (the run got that far) ...
    assert aliases(NAME)["champion"] == services["version"]  # ... but the champion did not move


def test_certified_champion_is_recertified_and_tagged(services):
    from pcee.registry import aliases
    from pcee.registry.tracking import client

    client().set_model_version_tag(NAME, services["version"], "target_accuracy", "0.8")  # the certificate, no meta
    _log_traffic(services["model"], 200, seed=3)
    module = load_flow_module("recalibrate")
    result = module.recalibrate(model_name=NAME, min_labels=50)
    assert result["gate"] == "certificate" and result["target_accuracy"] == 0.8, result
    assert result["status"] == "certified" and result["certified"], result["reason"]
    assert result["accuracy_lower_bound"] >= 0.8 and result["n_holdout"] == 60
    new = result["new_version"]
    assert aliases(NAME)["champion"] == new != services["version"]
    tags = dict(client().get_model_version(NAME, new).tags)
    assert tags["certified"] == "true" and tags["target_accuracy"] == "0.8" and tags["bound"] == "clopper-pearson"
    assert tags["n_calibrate"] == "60" and float(tags["delta"]) == result["new_threshold"]
    assert tags["recalibration_gate"] == "certificate"


def _log_shadow_traffic(model, n: int, seed: int) -> None:
    """n shadow rows (ran to the final exit, input stored), no feedback: what the label-free refit reads."""
    from pcee.traffic.store import RequestRecord, TrafficStore, new_request_id
    from pcee.training.evaluate import predict_all_exits

    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 8, 8), dtype=np.float32)
    final = predict_all_exits(model, x)[:, -1].argmax(-1)
    store = TrafficStore.from_settings(Settings())
    store.log_requests(
        [
            RequestRecord(
                id=new_request_id(),
                time=datetime.now(UTC),
                model_version="1",
                delta=0.9,
                policy="pcee",
                exit=0,
                prediction=0,
                confidence=0.5,
                expected_accuracy=0.9,
                confidences=[0.5],
                flops=1.0,
                latency_ms=1.0,
                input=x[i],
                shadow=True,
                final_prediction=int(final[i]),
            )
            for i in range(n)
        ]
    )
    store.dispose()


def test_drift_alert_registers_the_label_free_version_then_the_labelled_one(services):
    from pcee.bundle import ModelBundle
    from pcee.registry import aliases
    from pcee.registry.tracking import client

    # the untrained network is right about a third of the time: a target it can meet
    client().set_model_version_tag(NAME, services["version"], "target_accuracy", "0.3")
    module = load_flow_module("recalibrate")
    # labels have not arrived: only shadow rows -> the label-free version, and no labelled refit
    _log_shadow_traffic(services["model"], 300, seed=4)
    first = module.recalibrate(model_name=NAME, min_labels=50)
    lf = first["label_free"]
    assert lf["status"] == "label_free", lf["reason"]
    assert first["status"] == "too_few_labels" and first["new_version"] is None
    v_lf = lf["new_version"]
    assert aliases(NAME)["champion"] == v_lf != services["version"]
    tags = dict(client().get_model_version(NAME, v_lf).tags)
    assert tags["recalibration_kind"] == "label_free" and tags["certified"] == "false" and tags["mode"] == "label_free"
    assert "estimated, no labels" in tags["guarantee"] and tags["answer_rule_kind"] == "estimated"
    desc = client().get_model_version(NAME, v_lf).description or ""
    assert (
        f"recalibrated from v{services['version']} (label-free" in desc and "not certified" in desc and "α=0.3" in desc
    ), desc
    assert lf["new_agreement"] >= lf["old_agreement"]
    meta = ModelBundle.load(module.R.fetch_bundle(NAME, v_lf, str(services["tmp"] / "lf"))).meta
    assert meta["recalibration"]["kind"] == "label_free" and meta["answer_rule"]["kind"] == "estimated"
    assert meta["operating_point"]["target_accuracy"] == 0.3 and meta["atc"]["thresholds"]  # the target carries on

    # labels arrive: the labelled refit runs on the label-free champion, against the same target α, with a certificate
    _log_traffic(services["model"], 200, seed=5)
    second = module.recalibrate(model_name=NAME, min_labels=50, label_free=False)
    assert second["label_free"] == {"status": "skipped"}
    assert second["gate"] == "certificate" and second["target_accuracy"] == 0.3, second
    assert second["status"] in ("certified", "selective", "conservative"), second["reason"]
    v_lab = second["new_version"]
    assert int(v_lab) > int(v_lf) and aliases(NAME)["champion"] == v_lab
    tags = dict(client().get_model_version(NAME, v_lab).tags)
    assert tags["recalibration_kind"] == "labelled" and tags["recalibrated_from"] == v_lf

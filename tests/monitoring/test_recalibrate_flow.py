"""Integration: the ``recalibrate`` flow against a real MLflow store, traffic store and Prefect server.

- a drift alarm (shadow rows, no labels) → the label-free version, promoted at once, "unverified under
  drift" or "label-free lower bound", waiting for labels; labels on its requests → the certified version;
- too few labels → a status, nothing registered, champion unchanged;
- killed at the last moment (SIGKILL just before the alias move) → champion unchanged.

The champion carries its label-free bound in its meta (estimators and margin from synthetic logits), so
no dataset is needed here; ``make demo`` (tests/test_closed_loop.py) runs the path that measures it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.monitoring.conftest import load_flow_module
from tests.records import request_record

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
    meta = {"data": "synthetic", "label_free_bound": _bound(model, policy, logits, labels)}
    bundle_dir = ModelBundle(model, policy, flops, meta).save(
        tmp_path / "bundle", reference=ExitOutputs(logits, labels, flops)
    )
    _, version = log_and_register(
        experiment="pcee-test", run_name="v1", model_name=NAME, bundle_dir=bundle_dir, params={}, metrics={}, tags={}
    )
    promote(NAME, version)
    assert aliases(NAME)["champion"] == version
    return {"env": env, "model": model, "version": version, "tmp": tmp_path}


def _bound(model, policy, logits, labels) -> dict:
    """The label-free estimators (first half of the rows) and their margin from two noisy copies of the rest."""
    from pcee.label_free_bound import ShiftEstimators, calibrate_margin
    from pcee.training.evaluate import predict_all_exits

    est = ShiftEstimators.fit(logits[:150], labels[:150])
    rng = np.random.default_rng(1)
    x = rng.random((150, 1, 8, 8), dtype=np.float32)
    clean = predict_all_exits(model, x)
    y = clean[:, 0].argmax(-1)
    shifts = [
        (
            "noise",
            f"noise/{s}",
            predict_all_exits(model, np.clip(x + s * rng.standard_normal(x.shape).astype(np.float32), 0, 1)),
            y,
        )
        for s in (0.1, 0.3)
    ]
    return {"estimators": est.to_dict(), "calibration": calibrate_margin(est, policy, shifts).to_dict()}


def _log_shadow_traffic(model, n: int, seed: int) -> None:
    """n shadow rows (ran to the final exit, input stored), no feedback: what the label-free version reads."""
    from pcee.settings import Settings
    from pcee.traffic.store import TrafficStore
    from pcee.training.evaluate import predict_all_exits

    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 8, 8), dtype=np.float32)
    final = predict_all_exits(model, x)[:, -1].argmax(-1)
    store = TrafficStore.from_settings(Settings())
    store.log_requests([_record("1", 0, 0.9, x[i], shadow=True, final_prediction=int(final[i])) for i in range(n)])
    store.dispose()


def _record(version: str, prediction: int, expected: float, x=None, **kw):

    return request_record(model_version=version, prediction=prediction, expected_accuracy=expected, input=x, **kw)


def _label_requests(version: str, n: int, seed: int) -> None:
    """n requests answered by ``version`` with feedback equal to their prediction (the plumbing is under test)."""
    from pcee.settings import Settings
    from pcee.traffic.store import TrafficStore

    rng = np.random.default_rng(seed)
    records = [_record(version, int(rng.integers(10)), float(rng.uniform(0.5, 1.0))) for _ in range(n)]
    store = TrafficStore.from_settings(Settings())
    store.log_requests(records)
    for r in records:
        store.add_feedback(r.id, r.prediction)
    store.dispose()


def _versions(name: str) -> list[str]:
    from pcee.registry.tracking import client

    return sorted(str(mv.version) for mv in client().search_model_versions(f"name='{name}'"))


def test_drift_alert_registers_the_label_free_version_then_the_certified_one(services):
    from pcee.bundle import ModelBundle
    from pcee.registry import aliases
    from pcee.registry.tracking import client

    client().set_model_version_tag(NAME, services["version"], "target_accuracy", "0.8")  # the operator's α
    module = load_flow_module("recalibrate")
    _log_shadow_traffic(services["model"], 300, seed=4)
    first = module.recalibrate(model_name=NAME)
    assert first["kind"] == "label_free" and first["status"] in ("unverified under drift", "label-free lower bound")
    v_lf = first["new_version"]
    assert aliases(NAME)["champion"] == v_lf != services["version"]  # promoted at once: no silent break
    tags = dict(client().get_model_version(NAME, v_lf).tags)
    assert (
        tags["recalibration_kind"] == "label_free"
        and tags["certified"] == "false"
        and tags["verification"] == first["status"]
    )
    assert "estimated, no labels" in tags["guarantee"]
    meta = ModelBundle.load(module.R.fetch_bundle(NAME, v_lf, str(services["tmp"] / "lf"))).meta
    assert meta["verification"]["status"] == first["status"] and meta["verification"]["label_budget"] == 150
    assert meta["operating_point"]["target_accuracy"] == 0.8 and meta["label_free_bound"]  # carried on

    _label_requests(v_lf, 60, seed=5)  # the first look (50 labels) is reached
    second = module.recalibrate(model_name=NAME, label_free=False)
    assert second["kind"] == "few_labels" and second["status"] == "certified", second["reason"]
    v_cert = second["new_version"]
    assert int(v_cert) > int(v_lf) and aliases(NAME)["champion"] == v_cert
    tags = dict(client().get_model_version(NAME, v_cert).tags)
    assert tags["recalibration_kind"] == "few_labels" and tags["recalibrated_from"] == v_lf
    assert tags["certified"] == "true" and tags["answer_rule_kind"] == "certified" and tags["n_labels"] == "60"
    meta = ModelBundle.load(module.R.fetch_bundle(NAME, v_cert, str(services["tmp"] / "cert"))).meta
    assert meta["verification"]["status"] == "certified" and meta["answer_rule"]["kind"] == "certified"
    # the certified version waits for nothing: a few-label run changes nothing
    third = module.recalibrate(model_name=NAME, label_free=False)
    assert third["status"] == "nothing_to_certify" and aliases(NAME)["champion"] == v_cert


def test_too_few_labels_changes_nothing(services):
    from pcee.registry import aliases

    module = load_flow_module("recalibrate")
    _log_shadow_traffic(services["model"], 100, seed=1)
    v_lf = module.recalibrate(model_name=NAME)["new_version"]
    before = _versions(NAME)
    _label_requests(v_lf, 20, seed=2)
    result = module.recalibrate(model_name=NAME, label_free=False)
    assert result["status"] == "waiting_for_labels" and result["n_labels"] == 20 and result["new_version"] is None
    assert "waiting for labels (20/150)" in result["reason"]
    assert aliases(NAME)["champion"] == v_lf and _versions(NAME) == before  # never a half-written version


def test_killed_before_alias_move_leaves_champion(services):
    from pcee.registry import aliases

    _log_shadow_traffic(services["model"], 100, seed=3)
    script = textwrap.dedent(f"""
        import os, signal
        import flows.recalibrate as module
        def killed(*args, **kwargs):  # the process dies right before the alias move
            os.kill(os.getpid(), signal.SIGKILL)
        module.R.promote = killed
        module.recalibrate(model_name={NAME!r})
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
    assert len(versions) == 2  # the label-free version was registered (the run got that far) ...
    assert aliases(NAME)["champion"] == services["version"]  # ... but the champion did not move

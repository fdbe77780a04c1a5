"""Integration: a label-free version serving after a drift alarm says "unverified under drift" in every
response, /health and /metrics; labels arrive in pieces; /health and /metrics move from "waiting for labels
(n/150)" to certified once a look of the few-label schedule passes; too few labels change nothing.

A real ``pcee serve`` (uvicorn, SQLite traffic store) on a local bundle directory; the certified version is
written there the way the recalibrate flow writes it (``flows.recalibrate.certified_meta``), and the service
reloads it by itself."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from pcee.few_labels import certify_few_labels
from tests.serving.conftest import build_bundle, start_server

pytestmark = pytest.mark.integration
ALPHA, BUDGET = 0.9, 150
UNVERIFIED_META = {
    "operating_point": {"target_accuracy": ALPHA, "risk": 0.1, "bound": "clopper-pearson", "mode": "label_free"},
    "answer_rule": {"threshold": 1.0, "kind": "unverified", "target_accuracy": ALPHA},
    "verification": {"status": "unverified under drift", "label_budget": BUDGET, "reason": "drift alarm, no labels"},
}


def _digest(path: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()


def _metric(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name)]


def _label(server, answers: list[dict]) -> None:
    """Feedback for ``answers``: the label is the prediction (the plumbing is under test, not the model)."""
    for a in answers:
        r = httpx.post(f"{server.url}/feedback", json={"request_id": a["request_id"], "label": a["prediction"]})
        assert r.status_code == 200, r.text


def _certify(server, bundle_dir: Path, version: str):
    """What the recalibrate flow's few-label step does, on the service's own store."""
    from flows.recalibrate import certified_meta
    from pcee.bundle import ModelBundle

    store = server.store()
    try:
        answers = store.labelled_answers(version)
    finally:
        store.dispose()
    result = certify_few_labels(answers.expected_accuracy, answers.correct, ALPHA, 0.1, budget=BUDGET)
    if result.status == "certified":
        bundle = ModelBundle.load(bundle_dir)
        reference = ModelBundle.load_reference(bundle_dir)
        ModelBundle(bundle.model, bundle.policy, bundle.flops, certified_meta(bundle, result, version)).save(
            bundle_dir, reference=reference
        )
    return result


def test_unverified_then_waiting_then_certified(tmp_path):
    from pcee.data.datasets import load_dataset

    bundle_dir = build_bundle(tmp_path / "bundle", meta_extra=UNVERIFIED_META, logit_scale=8.0)
    server = start_server(
        tmp_path / "srv", "--bundle", str(bundle_dir), "--poll-interval", "0.5", "--store-fraction", "0", timeout=300
    )
    try:
        x = load_dataset("digits", seed=0).test.x.astype(np.float32)
        body = {"inputs": x[:100, 0].tolist()}
        answers = httpx.post(f"{server.url}/predict", json=body, timeout=30).json()["results"]
        assert not any(a["answered"] for a in answers)  # every request declined, its best guess returned
        assert {a["verification"] for a in answers} == {"unverified under drift"}
        health = httpx.get(f"{server.url}/health").json()
        version = health["model_version"]
        assert (
            health["verification"] == "unverified under drift"
            and health["labels"] == f"waiting for labels (0/{BUDGET})"
        )
        metrics = httpx.get(f"{server.url}/metrics").text
        assert _metric(metrics, 'pcee_verification{status="unverified under drift"} 1')
        assert _metric(metrics, "pcee_labels_received 0") and _metric(metrics, f"pcee_label_budget {BUDGET}")

        before = _digest(bundle_dir)
        _label(server, answers[:25])  # too few labels: a status, never a half-written version
        result = _certify(server, bundle_dir, version)
        assert result.status == "waiting_for_labels" and result.labels_line == f"waiting for labels (25/{BUDGET})"
        assert _digest(bundle_dir) == before
        health = httpx.get(f"{server.url}/health").json()
        assert health["labels"] == f"waiting for labels (25/{BUDGET})" and health["model_version"] == version
        assert _metric(httpx.get(f"{server.url}/metrics").text, "pcee_labels_received 25")

        _label(server, answers[25:50])
        result = _certify(server, bundle_dir, version)
        assert result.status == "certified" and result.rule is not None
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health").json()["model_version"] == version and time.monotonic() < deadline:
            time.sleep(0.3)
        health = httpx.get(f"{server.url}/health").json()
        assert health["model_version"] != version, "the service did not reload the certified version"
        assert health["verification"] == "certified" and health["labels"] is None
        assert health["answer_rule_kind"] == "certified"
        metrics = httpx.get(f"{server.url}/metrics").text
        assert _metric(metrics, 'pcee_verification{status="certified"} 1')
        assert not _metric(metrics, 'pcee_verification{status="unverified under drift"}')
        after = httpx.post(f"{server.url}/predict", json=body, timeout=30).json()["results"]
        assert {a["verification"] for a in after} == {"certified"}
        assert np.mean([a["answered"] for a in after]) > 0
    finally:
        server.stop()

"""The FastAPI app in-process (no uvicorn): every response counted once by its route and status,
one metrics registry per app, /feedback validated by its pydantic model, and real responses that
match the documented schemas."""

from __future__ import annotations

import json
import math

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pcee.serving.app import ServeConfig, Service, create_app
from pcee.serving.model_source import LocalBundleSource
from pcee.serving.schemas import ErrorResponse, FeedbackResponse, HealthResponse, PredictAnswer, PredictBatchResponse
from pcee.traffic.store import TrafficStore


@pytest.fixture
def make_client(bundle_dir, tmp_path):
    services: list[Service] = []
    clients: list[TestClient] = []

    def make() -> tuple[TestClient, Service]:
        store = TrafficStore(f"sqlite:///{tmp_path / f'traffic{len(services)}.db'}")
        service = Service(ServeConfig(poll_interval_s=0, seed=0), LocalBundleSource(bundle_dir), store)
        service.start()
        services.append(service)
        client = TestClient(create_app(service), raise_server_exceptions=False)
        clients.append(client)
        return client, service

    yield make
    for client in clients:
        client.close()
    for service in services:
        service.stop()
        if service.feedback_store is not None:
            service.feedback_store.dispose()


def samples(client: TestClient, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if s.name == name
    }


def http_count(client: TestClient, endpoint: str, status: int) -> float:
    return samples(client, "pcee_http_requests_total").get((("endpoint", endpoint), ("status", str(status))), 0.0)


def test_every_response_is_counted_once_by_route_and_status(make_client, digits_test, monkeypatch):
    client, service = make_client()
    x, _ = digits_test
    assert client.post("/predict", json={"inputs": x[0].tolist()}).status_code == 200
    assert client.post("/predict", json={"inputs": [[1, 2]]}).status_code == 422
    assert client.get("/predict").status_code == 405  # FastAPI's own answers count too
    assert client.get("/no/such/path").status_code == 404
    assert client.get("/no/other/path").status_code == 404
    assert client.get("/health").status_code == 200

    async def broken(_x):
        raise RuntimeError("boom")

    monkeypatch.setattr(service.batcher, "submit", broken)
    r = client.post("/predict", json={"inputs": x[0].tolist()})
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError", "status": 500}

    counts = samples(client, "pcee_http_requests_total")
    assert counts == {
        (("endpoint", "/predict"), ("status", "200")): 1.0,
        (("endpoint", "/predict"), ("status", "422")): 1.0,
        (("endpoint", "/predict"), ("status", "405")): 1.0,
        (("endpoint", "/predict"), ("status", "500")): 1.0,
        (("endpoint", "unmatched"), ("status", "404")): 2.0,  # one series for any unknown path
        (("endpoint", "/health"), ("status", "200")): 1.0,
    }
    assert http_count(client, "/metrics", 200) == 1.0  # the scrape before this one
    assert samples(client, "pcee_errors_total")[(("problem", "internal"),)] == 1.0


def test_two_apps_in_one_process_keep_their_own_metrics(make_client, digits_test):
    a, _ = make_client()
    b, _ = make_client()
    x, _ = digits_test
    assert a.post("/predict", json={"inputs": x[:3].tolist()}).status_code == 200
    assert samples(a, "pcee_predictions_total") == {(): 3.0}
    assert samples(b, "pcee_predictions_total") == {(): 0.0}
    assert http_count(b, "/predict", 200) == 0.0
    decisions = samples(b, "pcee_decisions_total")  # every decision is exposed, at 0 before any traffic
    assert decisions == {(("decision", d),): 0.0 for d in ("answered", "abstained", "deferred", "deferral_failed")}
    assert math.isnan(samples(b, "pcee_window_coverage")[()])  # NaN while no sample was decided


def test_responses_match_their_documented_models(make_client, digits_test):
    client, _ = make_client()
    x, y = digits_test
    one = client.post("/predict", json={"inputs": x[0].tolist()}).json()
    PredictAnswer.model_validate(one, strict=True)
    assert set(one) == set(PredictAnswer.model_fields) - {"local_prediction", "fallback_model_version"}
    PredictBatchResponse.model_validate(client.post("/predict", json={"inputs": x[:2].tolist()}).json(), strict=True)
    health = client.get("/health").json()
    assert set(health) == set(HealthResponse.model_fields)
    HealthResponse.model_validate(health)
    assert health["device"] == "cpu"  # where the model runs
    fb = client.post("/feedback", json={"request_id": one["request_id"], "label": int(y[0])})
    assert fb.json() == FeedbackResponse(request_id=one["request_id"], label=int(y[0]), created=True).model_dump()
    ErrorResponse.model_validate(client.post("/feedback", content=b"{nope").json(), strict=True)

    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {"/predict", "/feedback", "/health", "/metrics"}
    assert {"PredictAnswer", "PredictBatchResponse", "FeedbackResponse", "HealthResponse", "ErrorResponse"} <= set(
        spec["components"]["schemas"]
    )
    feedback_body = spec["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert feedback_body["required"] == ["request_id", "label"]
    assert {"application/json", "multipart/form-data", "image/png"} <= set(
        spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    )


BAD_FEEDBACK = [
    ({"label": "three"}, "\"label\" must be a non-negative integer class index, got 'three'"),
    ({"label": True}, '"label" must be a non-negative integer class index, got True'),
    ({"label": 3.0}, '"label" must be a non-negative integer class index, got 3.0'),
    ({"label": -1}, '"label" must be a non-negative integer class index, got -1'),
    ({"label": None}, '"label" must be a non-negative integer class index, got None'),
    ({"request_id": ""}, "\"request_id\" must be the UUID returned by /predict, got ''"),
    ({"request_id": "abc"}, "\"request_id\" must be the UUID returned by /predict, got 'abc'"),
    ({"request_id": 5}, '"request_id" must be the UUID returned by /predict, got 5'),
]


def test_feedback_is_validated_by_its_model(make_client, digits_test):
    client, _ = make_client()
    x, _ = digits_test
    rid = client.post("/predict", json={"inputs": x[0].tolist()}).json()["request_id"]
    for change, message in BAD_FEEDBACK:
        r = client.post("/feedback", json={"request_id": rid, "label": 1, **change})
        assert (r.status_code, r.json()) == (422, {"error": message, "status": 422})
    missing = client.post("/feedback", json={"request_id": rid})
    assert missing.json()["error"] == '"label" must be a non-negative integer class index, got nothing'
    not_object = client.post("/feedback", json=[rid, 1])
    assert (not_object.status_code, not_object.json()["error"]) == (
        422,
        'feedback must be a JSON object {"request_id": str, "label": int}',
    )
    assert (
        client.post("/feedback", json={"request_id": rid, "label": 1, "note": "extra keys are ignored"}).status_code
        == 200
    )


def test_feedback_body_cap_holds(make_client):
    client, _ = make_client()
    r = client.post("/feedback", content=b"{" + b" " * 70_000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "payload too large" in r.json()["error"]


def test_answers_render_numpy_scalars_as_numbers():
    """The orjson renderer of /predict's answers takes what json.dumps took (numpy float64 is a float)."""
    import numpy as np

    from pcee.serving.app import _json

    body = _json({"confidence": np.float64(0.5), "exit": np.int64(2), "flops": 3.0, "delta": None}).body
    assert json.loads(body) == {"confidence": 0.5, "exit": 2, "flops": 3.0, "delta": None}


def test_the_device_is_checked_at_start_up():
    with pytest.raises(ValueError, match="need a CUDA device"):
        ServeConfig(graphs=True).validate()
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        ServeConfig(device="gpu").validate()

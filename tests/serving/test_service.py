"""The HTTP service against a real uvicorn server in a subprocess: answers, bad inputs, feedback,
health and metrics."""

from __future__ import annotations

import io
import json
import socket
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_declared() -> bytes:
    png = _png(Image.new("L", (8, 8)))
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", 200_000, 200_000)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return png[:16] + bytes(ihdr) + crc + png[33:]


def _bomb_real() -> bytes:
    return _png(Image.new("1", (4100, 4100)))  # valid PNG, 16.8 MPixels, a few kB


def test_predict_single_list_and_image(server, digits_test):
    x, _ = digits_test
    r = httpx.post(f"{server.url}/predict", json={"inputs": x[0].tolist()})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) >= {"request_id", "prediction", "exit", "confidence", "expected_accuracy", "model_version", "delta"}
    assert 0 <= out["prediction"] < 10 and 0 <= out["exit"] < 3 and out["delta"] == 0.5
    row = server.store().get_request(out["request_id"])
    assert row is not None and row["prediction"] == out["prediction"] and row["exit"] == out["exit"]
    assert row["confidences"][0] is not None  # the first exit is always computed
    assert all(c is None for c in row["confidences"][out["exit"] + 1 :])  # later exits were skipped

    r = httpx.post(f"{server.url}/predict", json={"inputs": x[:5].tolist()})
    assert r.status_code == 200 and len(r.json()["results"]) == 5
    assert len({a["request_id"] for a in r.json()["results"]}) == 5

    png = _png(Image.fromarray((x[1, 0] * 255).astype(np.uint8)))
    r = httpx.post(f"{server.url}/predict", files={"file": ("digit.png", png, "image/png")})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{server.url}/predict", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text


BAD_INPUTS = [
    ("wrong shape", lambda: {"json": {"inputs": np.zeros((2, 3, 8, 8)).tolist()}}, 422, "wrong shape"),
    (
        "NaN",
        lambda: {
            "content": b'{"inputs": ' + json.dumps([[0.5] * 8] * 7 + [[0.5] * 7 + [float("nan")]]).encode() + b"}"
        },
        422,
        "NaN/Inf",
    ),
    (
        "Inf",
        lambda: {"content": b'{"inputs": [[' + b"Infinity," * 7 + b"1]" + b",[1,1,1,1,1,1,1,1]" * 7 + b"]}"},
        422,
        "NaN/Inf",
    ),
    ("strings", lambda: {"json": {"inputs": [["x"] * 8] * 8}}, 422, "must be numbers"),
    ("empty body", lambda: {"content": b"", "headers": {"content-type": "application/json"}}, 400, "empty body"),
    (
        "malformed JSON",
        lambda: {"content": b'{"inputs": [[0.1, 0.2', "headers": {"content-type": "application/json"}},
        400,
        "malformed JSON",
    ),
    ("no inputs key", lambda: {"json": {"pixels": [1, 2]}}, 422, '"inputs"'),
    (
        "10 MB payload",
        lambda: {"content": b"[" + b"0," * 5_000_000 + b"0]", "headers": {"content-type": "application/json"}},
        413,
        "payload too large",
    ),
    (
        "not an image (raw)",
        lambda: {"content": b"GIF? no, just text", "headers": {"content-type": "image/png"}},
        415,
        "not an image",
    ),
    (
        "not an image (multipart)",
        lambda: {"files": {"file": ("x.png", b"\x89PNG but not really", "image/png")}},
        415,
        "not an image",
    ),
    (
        "declared-size bomb",
        lambda: {"files": {"file": ("bomb.png", _bomb_declared(), "image/png")}},
        413,
        "decompression bomb",
    ),
    ("real bomb", lambda: {"files": {"file": ("bomb.png", _bomb_real(), "image/png")}}, 413, "decompression bomb"),
    (
        "unsupported type",
        lambda: {"content": b"a,b,c", "headers": {"content-type": "text/csv"}},
        415,
        "unsupported content type",
    ),
]


@pytest.mark.parametrize("name, request_kw, status, needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_4xx_and_nothing_is_logged(server, digits_test, name, request_kw, status, needle):
    store = server.store()
    before = store.count_requests()
    try:
        r = httpx.post(f"{server.url}/predict", timeout=30, **request_kw())
    except httpx.HTTPError as err:  # pragma: no cover - would mean the server dropped the connection
        pytest.fail(f"{name}: no HTTP answer ({err!r})")
    assert r.status_code == status, r.text
    body = r.json()
    assert needle in body["error"], body
    assert store.count_requests() == before  # nothing logged as a prediction
    # the service keeps answering
    x, _ = digits_test
    ok = httpx.post(f"{server.url}/predict", json={"inputs": x[0].tolist()})
    assert ok.status_code == 200
    assert store.count_requests() == before + 1
    store.dispose()


def test_oversized_body_is_refused_before_it_is_read(server):
    """Declare 10 MB, send only 64 kB: the 413 must come back without the server waiting for the rest."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10 * 1024 * 1024}\r\n\r\n"
        ).encode()
        sock.sendall(head + b"[" + b"0," * 32_000)
        data = b""
        while b"payload too large" not in data:  # the body may come in a second segment
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        reply = data.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "payload too large" in reply


def test_feedback_unknown_repeated_and_bad(server, digits_test):
    x, y = digits_test
    rid = httpx.post(f"{server.url}/predict", json={"inputs": x[0].tolist()}).json()["request_id"]
    r = httpx.post(f"{server.url}/feedback", json={"request_id": "00000000-0000-0000-0000-000000000000", "label": 1})
    assert r.status_code == 404 and "unknown request_id" in r.json()["error"]
    first = httpx.post(f"{server.url}/feedback", json={"request_id": rid, "label": int(y[0])})
    assert first.status_code == 200 and first.json()["created"] is True
    again = httpx.post(f"{server.url}/feedback", json={"request_id": rid, "label": int(y[0])})
    assert again.status_code == 200 and again.json()["created"] is False
    other = httpx.post(f"{server.url}/feedback", json={"request_id": rid, "label": (int(y[0]) + 1) % 10})
    assert other.status_code == 409
    store = server.store()
    assert store.get_feedback(rid) == int(y[0])
    bad = httpx.post(f"{server.url}/feedback", json={"request_id": rid, "label": "three"})
    assert bad.status_code == 422 and "label" in bad.json()["error"]
    assert httpx.post(f"{server.url}/feedback", content=b"{nope").status_code == 400
    store.dispose()


def test_health_and_metrics(server, digits_test):
    h = httpx.get(f"{server.url}/health").json()
    assert h["status"] == "ok" and h["delta"] == 0.5 and h["input_shape"] == [1, 8, 8] and h["uptime_s"] > 0
    x, _ = digits_test
    httpx.post(f"{server.url}/predict", json={"inputs": x[:3].tolist()})
    text = httpx.get(f"{server.url}/metrics").text
    assert "# TYPE pcee_prediction_latency_seconds histogram" in text.splitlines()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def values(name: str) -> list[tuple[dict[str, str], float]]:
        return [(s.labels, s.value) for s in samples if s.name == name]

    [(_, predicted)] = values("pcee_predictions_total")
    assert predicted >= 3
    assert sum(v for _, v in values("pcee_exit_total")) == predicted
    assert any(
        lab == {"endpoint": "/predict", "status": "200"} and v >= 1 for lab, v in values("pcee_http_requests_total")
    )
    assert values("pcee_model_info") == [({"version": h["model_version"], "delta": "0.5"}, 1.0)]

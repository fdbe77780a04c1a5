"""Authenticated writes on a real server: with PCEE_SERVE_TOKEN set, a write without the token is refused
(missing, wrong, different length, wrong scheme), each refusal is a 401 counted in /metrics; /predict
needs it only when PCEE_SERVE_TOKEN_PREDICT is set; the per-client feedback limit answers 429.
``make up`` generates the token into the state directory's env.sh."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pcee.serving.auth import BearerAuth, ensure_token_file

TOKEN = "s3cret-token-for-the-tests-0123456789"
REPO = Path(__file__).resolve().parents[2]


def _metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, bundle_dir):
    """A server whose writes and predictions need the token, with a feedback limit of 6 per hour a client."""
    from tests.serving.conftest import start_server

    env = {"PCEE_SERVE_TOKEN": TOKEN, "PCEE_SERVE_TOKEN_PREDICT": "1", "PCEE_SERVE_FEEDBACK_RATE_LIMIT": "6/hour"}
    s = start_server(tmp_path_factory.mktemp("auth"), "--bundle", str(bundle_dir), "--poll-interval", "0", env=env)
    yield s
    s.stop()


@pytest.mark.integration
def test_writes_without_the_token_are_refused(guarded, digits_test):
    x, y = digits_test
    ok = {"Authorization": f"Bearer {TOKEN}"}
    url = guarded.url
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/predict", json={"inputs": x[0].tolist()}).status_code == 401  # predict needs it too here
        r = c.post("/predict", json={"inputs": x[0].tolist()}, headers=ok)
        assert r.status_code == 200, r.text
        body = {"request_id": r.json()["request_id"], "label": int(y[0])}
        refusals = {
            "missing": {},
            "wrong, same length": {"Authorization": "Bearer " + "x" * len(TOKEN)},
            "wrong, other length": {"Authorization": "Bearer " + TOKEN[:-1]},
            "right token, other scheme": {"Authorization": f"Basic {TOKEN}"},
        }
        for what, headers in refusals.items():
            refused = c.post("/feedback", json=body, headers=headers)
            assert refused.status_code == 401, (what, refused.text)
            assert refused.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in refused.json()["error"] and TOKEN not in refused.text
        assert guarded.store().get_feedback(body["request_id"]) is None  # nothing written
        assert c.post("/feedback", json=body, headers=ok).status_code == 200
        assert c.post("/feedback", json=body, headers={"authorization": f"bearer {TOKEN}"}).status_code == 200
        # the 7th feedback request of this client in the hour: the rate limit
        limited = c.post("/feedback", json=body, headers=ok)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1, limited.text
        assert (
            c.post("/predict", json={"inputs": x[1].tolist()}, headers=ok).status_code == 200
        )  # predict is not limited
        spec = c.get("/openapi.json").json()
    assert _metric(url, "pcee_auth_failures_total", endpoint="/feedback") == 4.0
    assert _metric(url, "pcee_auth_failures_total", endpoint="/predict") == 1.0
    assert _metric(url, "pcee_rate_limited_total") == 1.0
    assert _metric(url, "pcee_http_requests_total", endpoint="/feedback", status="401") == 4.0
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert spec["paths"]["/feedback"]["post"]["security"] == [{"bearer": []}]
    assert spec["paths"]["/predict"]["post"]["security"] == [{"bearer": []}]
    assert httpx.get(f"{url}/health", timeout=30).json()["auth"] is True


def test_the_comparison_takes_the_token_whole():
    auth = BearerAuth(TOKEN)
    assert auth.allows(f"Bearer {TOKEN}") and auth.allows(f"  bearer   {TOKEN} ")
    for header in (None, "", "Bearer", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Token {TOKEN}", TOKEN):
        assert not auth.allows(header), header
    assert BearerAuth(None).allows(None)  # no token configured: no authentication


def test_make_up_generates_one_token_into_env_sh(tmp_path, monkeypatch):
    from pcee_dev.services import manager as services

    monkeypatch.setenv("PCEE_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("PCEE_SERVE_TOKEN", raising=False)
    monkeypatch.delenv("PCEE_SCALE_OUT", raising=False)
    cfg = services.load_config()
    token = cfg.client_env()["PCEE_SERVE_TOKEN"]
    assert len(token) >= 32 and token == ensure_token_file(tmp_path)  # generated once, then kept
    assert stat.S_IMODE(os.stat(tmp_path / "serve_token").st_mode) == 0o600
    assert services.load_config().client_env()["PCEE_SERVE_TOKEN"] == token
    services.write_client_files(cfg, [])
    assert f"export PCEE_SERVE_TOKEN={token}\n" in (tmp_path / "env.sh").read_text()
    assert stat.S_IMODE(os.stat(tmp_path / "env.sh").st_mode) == 0o600
    monkeypatch.setenv("PCEE_SERVE_TOKEN", "an-operators-own-token-xyz")  # one set by hand wins, nothing generated
    assert "PCEE_SERVE_TOKEN" not in services.load_config().client_extra_env

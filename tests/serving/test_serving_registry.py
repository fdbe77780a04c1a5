"""The service and the MLflow registry: refuse to start without it, follow the champion alias,
keep serving when the registry goes away."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from pcee_dev.mlflow_server import mlflow_server_cmd
from tests.serving.conftest import build_bundle, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "pcee-digits-small-cnn"


def test_refuses_to_start_when_registry_is_unreachable(server_factory):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    srv = server_factory("--model-name", MODEL, "--tracking-uri", dead, wait=False)
    rc = srv.proc.wait(120)
    log = srv.log()
    assert rc == 3, log
    assert "refusing to start" in log and f"models:/{MODEL}@champion" in log and dead in log
    with pytest.raises(httpx.ConnectError):  # it never bound its port
        httpx.get(f"{srv.url}/health", timeout=2)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = mlflow_server_cmd(port, str(tmp_path / "artifacts"), backend=f"sqlite:///{tmp_path / 'mlflow.db'}")
    log = open(tmp_path / "mlflow.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError((tmp_path / "mlflow.log").read_text())
    yield proc, url
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    log.close()


def _wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_follows_champion_and_survives_registry_outage(
    mlflow_server, server_factory, tmp_path, monkeypatch, digits_test
):
    proc, url = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    from pcee.registry import log_and_register, promote

    def register(seed: int) -> str:
        bundle = build_bundle(tmp_path / f"bundle-{seed}", seed=seed)
        _, version = log_and_register(
            experiment="serving-test",
            run_name=f"seed-{seed}",
            model_name=MODEL,
            bundle_dir=bundle,
            params={"seed": seed},
            metrics={},
            tags={"test": "serving"},
        )
        return version

    v1 = register(1)
    promote(MODEL, v1)
    srv = server_factory("--model-name", MODEL, "--poll-interval", "0.5", env={"MLFLOW_TRACKING_URI": url})
    x, _ = digits_test
    first = httpx.post(f"{srv.url}/predict", json={"inputs": x[0].tolist()}).json()
    assert first["model_version"] == v1

    v2 = register(2)
    promote(MODEL, v2)  # the alias moves: the service must pick it up by itself
    _wait_for(lambda: httpx.get(f"{srv.url}/health").json()["model_version"] == v2, 60, f"reload to version {v2}")
    after = httpx.post(f"{srv.url}/predict", json={"inputs": x[0].tolist()}).json()
    assert after["model_version"] == v2
    assert srv.store().get_request(after["request_id"])["model_version"] == v2

    os.killpg(proc.pid, signal.SIGKILL)  # the registry goes away
    proc.wait(10)
    health = _wait_for(
        lambda: (h := httpx.get(f"{srv.url}/health").json())["registry_ok"] is False and h,
        60,
        "registry outage noticed",
    )
    assert health["model_version"] == v2 and "cannot resolve" in health["registry_error"]
    for i in range(5):  # still serving its model
        r = httpx.post(f"{srv.url}/predict", json={"inputs": x[i].tolist()})
        assert r.status_code == 200 and r.json()["model_version"] == v2
    assert "registry unreachable, keeping model version" in srv.log()
    assert "pcee_registry_up 0" in httpx.get(f"{srv.url}/metrics").text

"""Several serving replicas (issue: scale-out): ``make up``'s hook lists N replicas on consecutive
ports; two real uvicorn replicas on one shared traffic store answer concurrent clients and every
request answered 200 is logged exactly once, under a request id unique across replicas; a replica
killed with ``kill -9`` under load loses no acknowledged request while the other takes over.

The replicas, clients and checks are those of :mod:`benchmarks.replicas_load` (its functions; its
command line is not run here: another start of two replicas would double this file's time). The
store is SQLite (two writer processes on one WAL file), new when the replicas start together (they
race to create its tables: ``TrafficStore._create_all``); the benchmark also measures PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks import replicas_load as bench
from pcee_dev.services import manager as services
from pcee_dev.services.hooks import serving
from tests.serving.conftest import build_bundle

pytestmark = [pytest.mark.integration]

POLL_S = 0.5  # the replicas' model poll (make up: PCEE_SERVE_POLL_S, default 10 s)


# --- make up's hook (no servers) -------------------------------------------------------------------


@pytest.fixture
def hook(tmp_path, monkeypatch):
    """The serving hook and a services Config with its state dir in tmp_path; ``running`` stands for
    "the service was started", so the hook asks MLflow nothing."""
    cfg = services.Config(
        state_dir=tmp_path,
        prefect_port=4200,
        mlflow_port=5000,
        mlflow_backend_uri=f"sqlite:///{tmp_path / 'none.db'}",
        mlflow_artifacts_destination=str(tmp_path / "artifacts"),
        mlflow_workers=1,
    )
    monkeypatch.setattr(serving, "running", lambda c: ["http"])
    monkeypatch.setenv("PCEE_SERVE_PORT", "18100")
    monkeypatch.delenv("PCEE_SCALE_OUT", raising=False)
    return serving, cfg


def _ports(specs: list[dict]) -> list[int]:
    ports = []
    for s in specs:
        cmd = s["cmd"]
        port = int(cmd[cmd.index("--port") + 1])
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
        assert s["health_url"] == f"http://127.0.0.1:{port}/health" and s["url"] == f"http://127.0.0.1:{port}"
        ports.append(port)
    return ports


def test_hook_lists_replicas_on_consecutive_ports(hook, monkeypatch):
    serving, cfg = hook
    monkeypatch.delenv("PCEE_SERVE_REPLICAS", raising=False)
    one = serving.specs(cfg)
    assert [s["name"] for s in one] == ["http"] and _ports(one) == [18100]  # N = 1: as before

    monkeypatch.setenv("PCEE_SERVE_REPLICAS", "2")
    two = serving.specs(cfg)
    assert [s["name"] for s in two] == ["http", "http-2"]
    assert _ports(two) == [18100, 18101]
    assert {s["group"] for s in two} == {2}
    # the same command (model, options) but for the port, and the same environment (store, registry)
    assert [c for c in two[0]["cmd"] if c != "18100"] == [c for c in two[1]["cmd"] if c != "18101"]
    assert two[0]["env"] == two[1]["env"]

    monkeypatch.setenv("PCEE_SCALE_OUT", "1")  # scale-out's default: 2 replicas
    monkeypatch.delenv("PCEE_SERVE_REPLICAS")
    assert [s["name"] for s in serving.specs(cfg)] == ["http", "http-2"]


# --- two real replicas on one store ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    from pcee.data.datasets import load_dataset

    x = load_dataset("digits", seed=0).test.x.astype(np.float32)
    return [f'{{"inputs": {np.round(xi, 6).tolist()}}}'.encode() for xi in x]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("replicas-bundle") / "bundle")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, bundle):
    """Two replicas on consecutive ports, one SQLite store, both following one bundle directory
    (``served``: its content hash is the version, so changing it is a champion move); stopped
    (SIGTERM, then SIGKILL) at the end."""
    tmp = tmp_path_factory.mktemp("replicas")
    served = tmp / "served"
    shutil.copytree(bundle, served)
    url = f"sqlite:///{tmp / 'traffic.db'}"
    started = bench.start_replicas(served, tmp, url, 2, poll_interval_s=POLL_S)
    try:
        yield started, url, served
    finally:
        bench.stop_replicas(started)


def _new_rows(before: Counter, after: Counter) -> Counter:
    return Counter({rid: c - before.get(rid, 0) for rid, c in after.items() if c > before.get(rid, 0)})


@pytest.mark.slow
@pytest.mark.timeout(240)  # with the module's replicas starting (setup counts)
def test_two_replicas_log_every_answer_exactly_once(replicas, bodies):
    started, url, _ = replicas
    assert int(started[1].url.rsplit(":", 1)[1]) == int(started[0].url.rsplit(":", 1)[1]) + 1
    before = bench.logged_ids(url)
    run = asyncio.run(bench.drive(started, bodies, n=400, clients=4, kill_at=None))
    assert run.errors == 0 and run.failovers == 0, run.error_kinds
    assert len(run.acked) == 400
    assert run.per_replica[0] > 50 and run.per_replica[1] > 50, run.per_replica  # both really served
    assert len(set(run.acked)) == 400  # request ids unique across replicas
    new = _new_rows(before, bench.logged_ids(url))
    assert set(new) == set(run.acked)  # every answer logged, nothing else logged
    assert set(new.values()) == {1}  # exactly once
    # the store is shared: a label can go to any replica, whichever answered the request
    rid = httpx.post(f"{started[0].url}/predict", content=bodies[0], timeout=30).json()["request_id"]
    fb = httpx.post(f"{started[1].url}/feedback", json={"request_id": rid, "label": 3}, timeout=30)
    assert fb.status_code == 200 and fb.json()["created"] is True, fb.text


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_replica_reloads_when_the_model_moves(replicas):
    """Each replica polls its model source on its own (``Service._poll``; in ``make up`` the
    registry's ``@champion``): a new version reaches both, without a restart."""
    started, _, served = replicas
    old = {httpx.get(f"{r.url}/health", timeout=10).json()["model_version"] for r in started}
    assert len(old) == 1
    # a new version: the same weights, another meta.json (swapped in by rename, as a deployment would)
    new_dir = served.with_name("served.new")
    shutil.copytree(served, new_dir)
    meta = json.loads((new_dir / "meta.json").read_text())
    (new_dir / "meta.json").write_text(json.dumps({**meta, "replicas_test": "v2"}))
    served.rename(served.with_name("served.old"))
    new_dir.rename(served)
    deadline = time.monotonic() + 30
    while True:
        versions = [httpx.get(f"{r.url}/health", timeout=10).json()["model_version"] for r in started]
        if all(v not in old for v in versions):
            break
        assert time.monotonic() < deadline, f"not every replica reloaded within 30 s: {versions} (old {old})"
        time.sleep(0.2)
    assert len(set(versions)) == 1  # the same new version everywhere
    for r in started:  # one hot reload each, none failed (a half-swapped directory is skipped, not loaded)
        metrics = httpx.get(f"{r.url}/metrics", timeout=10).text
        assert 'pcee_model_reloads_total{outcome="ok"} 1.0' in metrics, metrics
        assert 'pcee_model_reloads_total{outcome="failed"} 1.0' not in metrics


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_kill_9_one_replica_under_load_loses_no_acknowledged_request(replicas, bodies):
    """Last in the module: it kills replica 1 of the shared fixture."""
    started, url, _ = replicas
    before = bench.logged_ids(url)
    run = asyncio.run(bench.drive(started, bodies, n=600, clients=4, kill_at=150))
    assert run.killed_after is not None and run.killed_after >= 150
    assert started[0].proc.wait(10) == -9  # really killed, mid-load
    assert run.failovers >= 1  # requests sent to it failed over to the other replica
    assert run.errors == 0, run.error_kinds
    assert len(run.acked) == 600 and len(set(run.acked)) == 600
    new = _new_rows(before, bench.logged_ids(url))
    missing = set(run.acked) - set(new)
    assert not missing, f"{len(missing)} acknowledged requests are not in the store"
    assert set(new.values()) == {1}
    # rows whose answer died with the process (their requests were retried under new ids): at most in flight
    assert len(new) - len(run.acked) <= 4

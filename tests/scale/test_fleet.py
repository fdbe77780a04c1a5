"""The serving fleet ``make up`` runs (:mod:`pcee_dev.services.hooks.serving`), with the real
supervisord, the real HAProxy and the real coordinator (:mod:`pcee_dev.fleet`) in front of two real
replicas on one traffic store: one address; a replica killed with ``kill -9`` under load costs the
clients nothing (HAProxy retries on the other), loses no acknowledged request, and is restarted;
a new model version reaches the replicas one at a time under load, every answer carrying a version
that was live; every socket the fleet listens on is on 127.0.0.1.

The one short fault test of the suite; the long runs (three replicas, 5,000 requests, a promotion
and a PostgreSQL restart under load, throughput through the balancer) are ``benchmarks/fleet_faults.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections import Counter
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from pcee.traffic.loadgen import run_load
from pcee_dev.haproxy import Runtime
from pcee_dev.proc import consecutive_free_ports, listening_sockets
from pcee_dev.services import manager as services
from pcee_dev.services.hooks.serving import fleet_specs
from pcee_dev.services.supervisor import Supervisor, socket_path
from tests.serving.conftest import build_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two replicas behind HAProxy on one SQLite store, following one bundle directory (its content
    hash is the version: replacing it is a champion move), the coordinator polling it every 0.5 s."""
    root = tmp_path_factory.mktemp("fleet")
    served = root / "served"
    build_bundle(served)
    port = consecutive_free_ports(4)[0]  # the address, two replicas, the stats page
    store = f"sqlite:///{root / 'traffic.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PCEE_STATE_DIR", str(root / "state"))
        cfg = services.load_config()
        env = {**cfg.client_env(), "PCEE_TRAFFIC_URL": store, "OMP_NUM_THREADS": "1"}
        specs = [
            services.ServiceSpec(**d)
            for d in fleet_specs(cfg.state_dir, ["--bundle", str(served)], port, 2, port + 3, 0.5, env)
        ]
        try:
            services.up(cfg, specs=specs)
            yield SimpleNamespace(
                cfg=cfg, specs=specs, url=f"http://127.0.0.1:{port}", stats=port + 3, store=store, served=served
            )
        finally:
            services.down(cfg)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from pcee.data.datasets import load_dataset

    return load_dataset("digits", seed=0).test.x.astype(np.float32)


def _rows(store_url: str) -> Counter:
    from sqlalchemy import text

    from pcee.traffic.store import TrafficStore

    store = TrafficStore(store_url)
    try:
        with store.engine.connect() as conn:
            return Counter({r[0]: r[1] for r in conn.execute(text("SELECT id, COUNT(*) FROM requests GROUP BY id"))})
    finally:
        store.dispose()


def _fleet_health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()["fleet"]


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.timeout(420)
def test_kill_9_under_load_then_a_rolling_reload(fleet, digits):
    admin = Runtime(socket_path(fleet.cfg.state_dir, "haproxy.sock"))
    assert set(admin.servers()) == {"http", "http-2"}
    health = _fleet_health(fleet.url)
    (old,) = health["versions_live"]
    assert [r["haproxy"] for r in health["replicas"]] == ["UP", "UP"]

    # 1. kill -9 of a replica under load: no client error, nothing acknowledged lost, restarted
    victim = services.running_pid(fleet.cfg, "http-2")

    async def load_and_kill():
        task = asyncio.create_task(run_load(fleet.url, digits, None, n=300, concurrency=4, keep_ids=True))
        await asyncio.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        return await task

    res = asyncio.run(load_and_kill())
    assert res.errors == 0, res.error_kinds
    assert len(res.request_ids) == 300 and len(set(res.request_ids)) == 300
    rows = _rows(fleet.store)
    assert not set(res.request_ids) - set(rows), "acknowledged requests missing from the store"
    assert set(rows.values()) == {1}
    _wait(lambda: services.running_pid(fleet.cfg, "http-2") not in (None, victim), 60, "supervisord's restart")
    _wait(lambda: admin.servers()["http-2"]["status"] == "UP", 300, "the restarted replica to be UP in HAProxy")
    assert Supervisor(fleet.cfg.state_dir).restarts()["http-2"]["restarts"] == 1

    # 2. a new version (same weights, another meta.json, swapped in by rename) while clients send:
    # the coordinator reloads the replicas one at a time; every answer carries a version live then
    new_dir = fleet.served.with_name("served.new")
    shutil.copytree(fleet.served, new_dir)
    meta = json.loads((new_dir / "meta.json").read_text())
    (new_dir / "meta.json").write_text(json.dumps({**meta, "fleet_test": "v2"}))

    async def load_during_move():
        task = asyncio.create_task(run_load(fleet.url, digits, None, n=400, concurrency=4))
        await asyncio.sleep(0.3)
        fleet.served.rename(fleet.served.with_name("served.old"))
        new_dir.rename(fleet.served)
        return await task

    res = asyncio.run(load_during_move())
    assert res.errors == 0, res.error_kinds

    def rolled_out() -> bool:
        live = _fleet_health(fleet.url)["versions_live"]
        return len(live) == 1 and live[0] != old

    _wait(rolled_out, 180, "every replica on the new version")
    (new,) = _fleet_health(fleet.url)["versions_live"]
    assert set(res.model_versions) <= {old, new}
    for spec in fleet.specs:
        if spec.name.startswith("http"):
            metrics = httpx.get(f"{spec.url}/metrics", timeout=10).text
            assert httpx.get(f"{spec.url}/health", timeout=10).json()["model_version"] == new
            assert 'pcee_model_reloads_total{outcome="failed"} 1.0' not in metrics
    log = (fleet.cfg.state_dir / "logs" / "fleet.log").read_text()
    assert log.count(f"now serves version {new}") == 2  # one replica after the other


def test_every_listening_socket_is_on_loopback(fleet):
    sup = Supervisor(fleet.cfg.state_dir)
    pids = [int(i["pid"]) for i in sup.all_info() if i["pid"]]
    found = listening_sockets(pids)
    ports = {port for _, _, port in found}
    assert int(fleet.url.rsplit(":", 1)[1]) in ports and fleet.stats in ports  # HAProxy's two
    assert len(found) >= 4, found  # and the replicas'
    assert {ip for _, ip, _ in found} == {"127.0.0.1"}, found
    # the balancer's own metrics, on loopback
    assert "haproxy_backend_active_servers" in httpx.get(f"http://127.0.0.1:{fleet.stats}/metrics", timeout=10).text

"""PostgreSQL as the engine of the traffic store and of MLflow's backend store: a real server
(``postgres_server``, :mod:`pcee_dev.postgres`), real subprocesses, the real HTTP service, and
``make up``'s hook (:mod:`pcee_dev.services.hooks.postgres`) run through the service manager."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest

from pcee.traffic.store import SCHEMA_LOCK, RequestRecord, TrafficStore, UnknownRequestError
from pcee_dev import postgres as pg
from pcee_dev.mlflow_server import mlflow_server_cmd
from pcee_dev.proc import listening_sockets
from pcee_dev.services import manager as services
from pcee_dev.services.hooks import postgres as postgres_hook
from tests.scale.conftest import free_port, traversable_tmpdir
from tests.traffic.test_store_selective import NEW_COLUMNS

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("postgres")]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _fresh_db(server: pg.PostgresServer, prefix: str) -> str:
    return server.create_database(f"{prefix}_{uuid.uuid4().hex[:8]}")


def _records(t0: datetime, n: int = 30) -> list[RequestRecord]:
    """Varied rows: every decision, shadow rows, stored inputs, NaN confidences, several times."""
    rng = np.random.default_rng(0)
    decisions = ["answered", "abstained", "deferred", "answered", "answered"]
    out = []
    for i in range(n):
        shadow = i % 7 == 0
        conf = rng.uniform(0.3, 1.0, 3).tolist()
        exit_ = i % 3
        out.append(
            RequestRecord(
                id=f"r{i:03d}",
                time=t0 + timedelta(seconds=i // 4),  # groups of 4 share a time, as a batch does
                model_version=str(1 + i // 20),
                delta=0.1,
                policy="pcee",
                exit=exit_,
                prediction=i % 10,
                confidence=conf[exit_],
                expected_accuracy=0.5 + (i % 5) / 10,
                confidences=[c if k <= exit_ else float("nan") for k, c in enumerate(conf)],
                flops=1000.0 * (exit_ + 1),
                latency_ms=1.5 + i,
                input=rng.normal(size=(1, 8, 8)).astype(np.float32) if (i % 3 == 0 or shadow) else None,
                decision=decisions[i % 5],
                answer_threshold=0.6,
                shadow=shadow,
                final_prediction=(i + 1) % 10 if shadow else None,
                shadow_confidences=conf if shadow else None,
            )
        )
    return out


def _exercise(store: TrafficStore, records: list[RequestRecord], t0: datetime) -> dict:
    """Write records in groups (as the batcher does), feedback and deferrals; read every window."""
    for k in range(0, len(records), 8):
        assert store.log_requests(records[k : k + 8]) == len(records[k : k + 8])
    fed = [store.add_feedback(r.id, r.prediction if j % 2 else (r.prediction + 1) % 10) for j, r in enumerate(records)]
    again = store.add_feedback(records[0].id, 9)  # idempotent: the first label stays
    with pytest.raises(UnknownRequestError):
        store.add_feedback("no-such-id", 1)
    deferred = [(r.id, r.prediction % 2 == 0, 7) for r in records if r.decision == "deferred"]
    updated = store.record_deferrals(deferred)
    w = store.recent_confidences(last=17)
    wt = store.recent_confidences(since=t0 + timedelta(seconds=2), until=t0 + timedelta(seconds=5), model_version="1")
    li = store.labelled_inputs(since=t0 + timedelta(seconds=1))
    sh = store.shadow_rows()
    sel = store.selective_window()
    return {
        "count": store.count_requests(),
        "feedback": (store.count_feedback(), fed, again, store.get_feedback(records[0].id)),
        "deferrals": updated,
        "ids": store.request_ids(),
        "rows": {r.id: store.get_request(r.id) for r in records},
        "input": store.get_input(records[3].id),
        "window": (w.ids, w.times, w.model_versions, w.exits.tolist(), w.confidences, w.decisions, w.expected_accuracy),
        "time_window": (wt.ids, wt.times, wt.confidences),
        "labelled": (li.ids, li.times, li.x, li.y.tolist()),
        "shadow": (sh.ids, sh.times, sh.x, sh.final_prediction.tolist(), sh.confidences),
        "selective": sel,
    }


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        np.testing.assert_allclose(a, b, err_msg=where)
    elif isinstance(a, float):
        assert a == pytest.approx(b) or (np.isnan(a) and np.isnan(b)), where
    elif isinstance(a, datetime):
        assert a.astimezone(UTC) == b.astimezone(UTC), where
    else:
        assert a == b, where


def test_traffic_store_on_postgres_matches_sqlite(postgres_server, tmp_path):
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    records = _records(t0)
    lite = TrafficStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    pgs = TrafficStore(_fresh_db(postgres_server, "t_store"))
    try:
        assert pgs.engine.dialect.name == "postgresql" and pgs.added_columns == []
        a, b = _exercise(lite, records, t0), _exercise(pgs, records, t0)
        assert a["count"] == 30 and len(a["window"][0]) == 17 and a["deferrals"] == 6  # the checks can fail
        assert len(a["shadow"][0]) == 5 and a["labelled"][2].shape[1:] == (1, 8, 8)
        assert a["feedback"][2] is False and a["feedback"][3] == records[0].prediction + 1
        _assert_same(a, b)
        # a second store on the same database (a restart) creates and migrates nothing
        again = TrafficStore(pgs.url)
        assert again.added_columns == [] and again.count_requests() == 30
        again.dispose()
    finally:
        lite.dispose()
        pgs.dispose()


_CREATE = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from pcee.traffic.store import TrafficStore
    gate = Path(sys.argv[2])
    (gate / f"ready-{os.getpid()}").touch()
    while not (gate / "go").exists():  # every process past its imports, then all at once
        time.sleep(0.001)
    store = TrafficStore(sys.argv[1])
    print(json.dumps({"added": store.added_columns, "count": store.count_requests()}))
    """
)

_OLD_SCHEMA = """
CREATE TABLE requests (
    id VARCHAR(36) PRIMARY KEY, time TIMESTAMP WITH TIME ZONE NOT NULL, model_version VARCHAR(64) NOT NULL,
    delta FLOAT, policy VARCHAR(64) NOT NULL, exit INTEGER NOT NULL, prediction INTEGER NOT NULL,
    confidence FLOAT NOT NULL, expected_accuracy FLOAT NOT NULL, confidences TEXT NOT NULL, confidence_0 FLOAT,
    flops FLOAT NOT NULL, latency_ms FLOAT NOT NULL, input_stored INTEGER NOT NULL);
INSERT INTO requests VALUES ('old-1', '2026-01-01T00:00:00Z', '1', 0.1, 'pcee', 0, 4, 0.9, 0.93,
    '[0.9, null]', 0.9, 10.0, 1.0, 0);
"""


@pytest.mark.slow
def test_processes_creating_and_migrating_the_schema_at_once_all_succeed(postgres_server, tmp_path):
    fresh = _fresh_db(postgres_server, "t_race_new")
    # hold the store's schema lock, so that both processes provably arrive at once and wait on it
    holder = psycopg.connect(pg.libpq_url_of(fresh), autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CREATE, fresh, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    # meanwhile, in threads (separate connections, the same race inside PostgreSQL): an old schema
    # migrated by two stores at once
    old = _fresh_db(postgres_server, "t_race_old")
    with psycopg.connect(pg.libpq_url_of(old), autocommit=True) as conn:
        conn.execute(_OLD_SCHEMA)
    barrier = threading.Barrier(2)
    migrated: list[list[str] | BaseException] = []

    def migrate() -> None:
        barrier.wait()
        try:
            store = TrafficStore(old)
            migrated.append(store.added_columns)
            store.dispose()
        except BaseException as err:  # noqa: BLE001 - reported by the assert below
            migrated.append(err)

    threads = [threading.Thread(target=migrate) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < len(procs):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (tmp_path / "go").touch()
    waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    while holder.execute(waiting).fetchone() != (len(procs),):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    tables = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    assert holder.execute(tables).fetchall() == []  # both wait before creating anything
    holder.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
    holder.close()
    outs = [p.communicate(timeout=60) for p in procs]
    for t in threads:
        t.join(60)
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out) for out, _ in outs]
    assert results == [{"added": [], "count": 0}] * 2  # a fresh database: created, nothing to migrate
    with psycopg.connect(pg.libpq_url_of(fresh)) as conn:
        assert {r[0] for r in conn.execute(tables)} == {"requests", "feedback", "inputs"}
    # exactly one store migrated, the other found it done
    assert sorted(migrated, key=len) == [[], NEW_COLUMNS], migrated
    store = TrafficStore(old)
    try:
        row = store.get_request("old-1")
        assert row["decision"] == "answered" and row["shadow"] is False
    finally:
        store.dispose()


@pytest.mark.slow
def test_mlflow_registry_runs_on_postgres(postgres_server, tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    backend = postgres_server.sqlalchemy_url(pg.MLFLOW_DB)
    log_path = tmp_path / "mlflow.log"
    cmd = mlflow_server_cmd(port, str(tmp_path / "artifacts"))
    # the backend URI carries the password: through the environment (owner-only /proc/PID/environ),
    # not the command line (world-readable, and written into make up's log)
    env = {**os.environ, **services.QUIET_ENV, "MLFLOW_BACKEND_STORE_URI": backend}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.3)
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        run = client.create_run(client.create_experiment("pg-test"))
        client.log_metric(run.info.run_id, "accuracy", 0.9)
        client.create_registered_model("pcee-pg-test")
        mv = client.create_model_version("pcee-pg-test", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        client.set_registered_model_alias("pcee-pg-test", "champion", mv.version)
        assert client.get_model_version_by_alias("pcee-pg-test", "champion").version == mv.version
        # the rows are in pcee_mlflow, and MLflow's tables are not in the traffic database
        with psycopg.connect(postgres_server.url(pg.MLFLOW_DB)) as conn:
            alias = conn.execute(
                "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'", ("pcee-pg-test",)
            ).fetchone()
            metric = conn.execute("SELECT value FROM metrics WHERE run_uuid = %s", (run.info.run_id,)).fetchone()
        assert alias == (int(mv.version),) and metric == (0.9,)
        with psycopg.connect(postgres_server.url(pg.TRAFFIC_DB)) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert "registered_models" not in tables
        assert postgres_server.password not in log_path.read_text(errors="replace")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.slow
def test_service_answers_503_while_postgres_is_down_and_resumes(postgres_server, tmp_path):
    from pcee.data.datasets import load_dataset
    from tests.serving.conftest import build_bundle, start_server

    x = load_dataset("digits", seed=0).test.x.astype(np.float32)
    bundle = build_bundle(tmp_path / "bundle")
    url = _fresh_db(postgres_server, "t_serve")
    srv = start_server(
        tmp_path / "srv", "--bundle", str(bundle), "--poll-interval", "0", "--traffic-url", url, "--max-wait-ms", "5"
    )
    store = TrafficStore(url)
    answered: list[str] = []

    def predict(k: int) -> httpx.Response:
        r = httpx.post(f"{srv.url}/predict", json={"inputs": x[k : k + 4].tolist()}, timeout=30)
        if r.status_code == 200:
            answered.extend(a["request_id"] for a in r.json()["results"])
        return r

    try:
        assert all(predict(k).status_code == 200 for k in range(0, 20, 4))
        assert store.request_ids() == set(answered) and len(answered) == 20
        postgres_server.stop()
        try:
            down = [predict(k) for k in range(20, 32, 4)]
            assert [r.status_code for r in down] == [503] * 3, [r.text for r in down]
            body = down[0].json()
            assert "could not be logged" in body["error"] and "traffic store" in body["error"], body
            assert srv.alive()
        finally:
            postgres_server.start()
        # the first request after the restart already finds the server (stale connections are replaced)
        back = [predict(k) for k in range(32, 52, 4)]
        assert [r.status_code for r in back] == [200] * 5, [r.text for r in back]
        assert len(answered) == 40 and store.request_ids() == set(answered)  # every 200 is in the store
    finally:
        store.dispose()
        srv.stop()
        if not postgres_server.running:
            postgres_server.start()


def _hook_spec(cfg):
    specs = [services.ServiceSpec(**d) for d in postgres_hook.specs(cfg)]
    assert [s.name for s in specs] == ["postgres"] and specs[0].group < 0
    return specs[0]


def _run_spec(cfg, spec):
    """What ``make up`` does with one spec: start it under supervisord, wait until healthy (SystemExit on failure)."""
    return services.up(cfg, specs=[spec])


@pytest.mark.slow
def test_make_up_hook_fails_clearly_and_runs_a_local_server(monkeypatch):
    state = traversable_tmpdir("pcee-pg-state-")
    monkeypatch.setenv("PCEE_STATE_DIR", str(state))
    monkeypatch.setenv("PCEE_DB", "postgres")
    try:
        # an existing server that is down: make up fails naming the URL, never the password
        secret = "s3cr3t-" + uuid.uuid4().hex[:6]
        dead = f"postgresql://alice:{secret}@127.0.0.1:{free_port()}/postgres"
        monkeypatch.setenv("PCEE_POSTGRES_URL", dead)
        cfg = services.load_config()
        with pytest.raises(SystemExit) as err:
            _run_spec(cfg, _hook_spec(cfg))
        msg = str(err.value)
        assert pg.mask_url(dead) in msg and "alice:***@127.0.0.1" in msg and secret not in msg, msg
        assert str(state / "logs" / "postgres.log") in msg
        assert secret not in (state / "logs" / "postgres.log").read_text()
        monkeypatch.delenv("PCEE_POSTGRES_URL")

        # the local server on a port someone else holds: fails naming its log
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            monkeypatch.setenv("PCEE_POSTGRES_PORT", str(busy.getsockname()[1]))
            cfg = services.load_config()
            with pytest.raises(SystemExit) as err:
                _run_spec(cfg, _hook_spec(cfg))
        msg = str(err.value)
        assert "postgres: exited with code" in msg and str(state / "logs" / "postgres.log") in msg, msg
        assert "could not" in msg  # PostgreSQL's own reason (could not bind/create listen socket)

        # on a free port: healthy once the role can log in; make down stops it at once (fast shutdown)
        port = free_port()
        monkeypatch.setenv("PCEE_POSTGRES_PORT", str(port))
        cfg = services.load_config()
        _run_spec(cfg, _hook_spec(cfg))
        try:
            found = listening_sockets([services.running_pid(cfg, "postgres")])
            assert {ip for _, ip, _ in found} == {"127.0.0.1"} and port in {p for *_, p in found}, found
            pw = (state / "postgres" / "password").read_text().strip()
            assert oct((state / "postgres" / "password").stat().st_mode & 0o777) == "0o600"
            assert (state / "postgres" / "data").stat().st_mode & 0o777 == 0o700
            from pcee.settings import Settings

            assert pg.traffic_url(Settings()) == f"postgresql+psycopg://pcee:{pw}@127.0.0.1:{port}/pcee_traffic"
            held = psycopg.connect(pg.libpq_url_of(pg.mlflow_backend_uri(Settings())))  # an open client
            assert held.execute("SELECT current_user").fetchone() == ("pcee",)
            pg.local_server(Settings()).setup()  # a second set-up (the next make up): the role exists
            assert held.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'pcee_%'").fetchone() == (2,)
            services.down(cfg)  # an open client does not keep the server up
            assert services.running_pid(cfg, "postgres") is None
            held.close()
            log = (state / "logs" / "postgres.log").read_text()
            assert "ready to accept connections" in log and pw not in log  # the password never reaches the log
        finally:
            services.down(cfg)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_url_helpers_mask_the_password_and_keep_the_rest():
    url = "postgresql://alice:p%40ss@db.example:6543/postgres?sslmode=require"
    assert pg.mask_url(url) == "postgresql://alice:***@db.example:6543/postgres?sslmode=require"
    assert pg.mask_url("postgresql://alice@h/db") == "postgresql://alice@h/db"
    mlflow = pg.with_database(pg.sqlalchemy_url_of(url), pg.MLFLOW_DB)
    assert mlflow == "postgresql+psycopg://alice:p%40ss@db.example:6543/pcee_mlflow?sslmode=require"
    assert pg.libpq_url_of(mlflow).startswith("postgresql://alice:p%40ss@")
    with pytest.raises(pg.PostgresError, match=r"not a PostgreSQL URL: mysql://u:\*\*\*@h/db"):
        pg.sqlalchemy_url_of("mysql://u:secret@h/db")

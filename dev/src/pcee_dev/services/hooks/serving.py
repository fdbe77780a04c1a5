"""``make up`` hook: the HTTP service serving ``@champion``, as a fleet behind one address.

- ``http``, ``http-2``, ... (group 2): ``PCEE_SERVE_REPLICAS`` (default 1; 2 under ``PCEE_SCALE_OUT``)
  replicas of ``python -m pcee.cli serve`` on 127.0.0.1, ports ``PCEE_SERVE_PORT+1``, ``+2``, ...:
  the same model, the same traffic store (``PCEE_TRAFFIC_URL``; PostgreSQL for several writers,
  SQLite works but its writers take turns), request ids uuid4, unique across replicas. They do not
  poll the registry themselves: the coordinator reloads them (below).
- ``lb`` (group 3): HAProxy (:mod:`pcee_dev.haproxy`) on 127.0.0.1:``PCEE_SERVE_PORT``, the one address
  clients use (``pcee traffic``, the demo, the benchmarks): health checks, a retry on another replica
  for a request whose replica refused or dropped the connection; stats and metrics on
  127.0.0.1:``PCEE_SERVE_STATS_PORT`` (``/stats``, ``/metrics``).
- ``fleet`` (group 3): the coordinator (:mod:`pcee_dev.fleet`): polls ``@champion`` every
  ``PCEE_SERVE_POLL_S`` and reloads the replicas one at a time behind the load balancer; answers the
  address's ``/health`` with the versions live on each replica.

Every one of them is restarted by supervisord when it dies. Other options the replicas read
themselves (pcee.settings): ``PCEE_MODEL_NAME`` (default ``pcee-digits-small-cnn``),
``PCEE_SERVE_STORE_FRACTION``, ``PCEE_SERVE_SHADOW_FRACTION``, ``PCEE_SERVE_ANSWER_MODE``,
``PCEE_SERVE_FALLBACK_URL``, ``PCEE_SERVE_FALLBACK_TIMEOUT_S`` (docs/architecture.md).
Authentication (:mod:`pcee.serving.auth`): ``make up`` generates ``PCEE_SERVE_TOKEN`` once into the
state directory (``serve_token``, 0600) and passes it to the replicas and to ``env.sh``: writes
(``POST /feedback``) need ``Authorization: Bearer $PCEE_SERVE_TOKEN``, and ``/predict`` too with
``PCEE_SERVE_TOKEN_PREDICT=1``.

The service needs a champion to serve (it refuses to start without one), so it is listed only once
the model has a champion in the MLflow registry, or while it already runs. Before that ``make up``
prints a line saying it is skipped; ``make demo`` starts it after training has registered the
champion. :func:`fleet_specs` builds the same fleet on any model source (tests, benchmarks).
"""

from __future__ import annotations

import re
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import httpx

from pcee.settings import Settings
from pcee_dev import haproxy
from pcee_dev.services.supervisor import Supervisor, socket_path

NAME = "http"
LB = "lb"
FLEET = "fleet"
DEFAULT_MODEL = "pcee-digits-small-cnn"  # what `make demo` trains


def running(cfg) -> list[str]:
    """The serving fleet's services supervisord runs now (replicas, coordinator, load balancer)."""
    pattern = re.compile(rf"{NAME}(-\d+)?|{LB}|{FLEET}")
    return [i["name"] for i in Supervisor(cfg.state_dir).all_info() if pattern.fullmatch(i["name"])]


def replica_name(k: int) -> str:
    """The service name of replica ``k`` (1-based): ``http``, ``http-2``, ``http-3``, ..."""
    return NAME if k == 1 else f"{NAME}-{k}"


def _champion(cfg, model: str) -> str | None:
    """The champion version, or None (no such model or alias, or MLflow not reachable yet)."""
    try:
        r = httpx.get(
            f"{cfg.mlflow_url}/api/2.0/mlflow/registered-models/alias",
            params={"name": model, "alias": "champion"},
            timeout=3,
        )
    except httpx.HTTPError:
        return _champion_from_sqlite(cfg, model)
    return r.json()["model_version"]["version"] if r.status_code == 200 else None


def _champion_from_sqlite(cfg, model: str) -> str | None:
    """``make up`` lists its services before MLflow starts: read the alias from a sqlite backend directly."""
    uri = cfg.mlflow_backend_uri
    if not uri.startswith("sqlite:///") or not Path(uri[len("sqlite:///") :]).is_file():
        return None
    try:
        with closing(sqlite3.connect(f"file:{uri[len('sqlite:///') :]}?mode=ro", uri=True, timeout=5)) as db:
            row = db.execute(
                "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = 'champion'", (model,)
            ).fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def fleet_specs(
    state_dir: Path,
    source_args: list[str],
    port: int,
    replicas: int,
    stats_port: int,
    poll_s: float,
    env: dict[str, str],
) -> list[dict]:
    """The replicas, the load balancer and the coordinator of one fleet serving ``source_args``
    (``["--model-name", NAME]`` or ``["--bundle", DIR]``) on 127.0.0.1:``port``."""
    last = max(port + replicas, stats_port)
    if last > 65535:
        raise SystemExit(
            f"{NAME}: {replicas} replicas and the stats port from port {port} need port {last}, past 65535"
        )
    members = [haproxy.Replica(replica_name(k), port + k) for k in range(1, replicas + 1)]
    admin, fleet_sock = socket_path(state_dir, "haproxy.sock"), socket_path(state_dir, "fleet.sock")
    replica_args = [a for r in members for a in ("--replica", f"{r.name}={r.port}")]
    return [
        *(_replica_spec(r, source_args, env) for r in members),
        _coordinator_spec(state_dir, source_args, replica_args, admin, fleet_sock, poll_s, env),
        _balancer_spec(state_dir, port, stats_port, replica_args, admin, fleet_sock),
    ]


def _replica_spec(replica: haproxy.Replica, source_args: list[str], env: dict[str, str]) -> dict:
    """One replica: ``pcee.cli serve`` on its own port, reloaded by the coordinator."""
    return {
        "name": replica.name,
        # the service reads its other PCEE_SERVE_* options itself (pcee.settings), from the environment
        # it inherits: every replica gets the same model, store (PCEE_TRAFFIC_URL) and options
        "cmd": [
            sys.executable,
            "-m",
            "pcee.cli",
            "serve",
            "--host",
            haproxy.HOST,
            "--port",
            str(replica.port),
            "--poll-interval",
            "0",  # the coordinator reloads it (SIGHUP), one replica at a time
            *source_args,
        ],
        "env": env,
        "health_url": f"{replica.url}/health",
        "url": replica.url,
        "group": 2,
        "startup_timeout": 300.0,  # imports torch and loads the model: minutes on a loaded machine
    }


def _coordinator_spec(
    state_dir: Path,
    source_args: list[str],
    replica_args: list[str],
    admin: Path,
    fleet_sock: Path,
    poll_s: float,
    env: dict[str, str],
) -> dict:
    """The coordinator (:mod:`pcee_dev.fleet`): polls the champion and reloads the replicas one at a time."""
    return {
        "name": FLEET,
        "cmd": [
            sys.executable,
            "-m",
            "pcee_dev.fleet",
            "--state-dir",
            str(state_dir),
            *replica_args,
            "--admin-socket",
            str(admin),
            "--health-socket",
            str(fleet_sock),
            "--poll",
            str(poll_s),
            *source_args,
        ],
        "env": env,
        "health_check": fleet_sock.exists,
        "group": 3,
    }


def _balancer_spec(
    state_dir: Path, port: int, stats_port: int, replica_args: list[str], admin: Path, fleet_sock: Path
) -> dict:
    """The load balancer (HAProxy) on the fleet's one address, healthy once the coordinator answers through it."""
    return {
        "name": LB,
        "cmd": [
            sys.executable,
            "-m",
            "pcee_dev.haproxy",
            "--config",
            str(state_dir / "haproxy" / "haproxy.cfg"),
            "--port",
            str(port),
            "--stats-port",
            str(stats_port),
            *replica_args,
            "--admin-socket",
            str(admin),
            "--fleet-socket",
            str(fleet_sock),
        ],
        "health_check": lambda: _fleet_answers(f"http://{haproxy.HOST}:{port}/health"),
        "url": f"http://{haproxy.HOST}:{port}",
        "group": 3,
    }


def _fleet_answers(url: str) -> bool:
    """The address's /health answers through HAProxy from the coordinator (a live replica behind it)."""
    try:
        r = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and "fleet" in r.json()


def specs(cfg) -> list[dict]:
    settings = Settings()
    model = settings.model_name or DEFAULT_MODEL
    if NAME not in running(cfg) and _champion(cfg, model) is None:
        print(
            f"{NAME}: skipped (no champion of {model} in MLflow yet; `make demo` trains one and starts the service)",
            file=sys.stderr,
        )
        return []
    return fleet_specs(
        cfg.state_dir,
        ["--model-name", model],
        settings.serve_port,
        settings.serve_replicas,
        settings.stats_port(),
        settings.serve_poll_s,
        cfg.client_env(),
    )

"""``make up`` hook: the HTTP service (``python -m pcee.cli serve``) serving ``@champion``.

Replicas: ``PCEE_SERVE_REPLICAS=N`` (default 1; 2 under ``PCEE_SCALE_OUT``) starts N identical
processes named ``http``, ``http-2``, ... on ports ``PCEE_SERVE_PORT``, ``PCEE_SERVE_PORT+1``, ...
(all on 127.0.0.1): the same model, the same traffic store (``PCEE_TRAFFIC_URL``; use PostgreSQL
for several writers, SQLite works but its writers take turns), each polling the registry on its
own (``PCEE_SERVE_POLL_S``), so every replica reloads within that time of a champion move. Request
ids are uuid4, unique across replicas. supervisord restarts a replica that dies. Other options the
replicas read themselves (pcee.settings): ``PCEE_MODEL_NAME`` (default ``pcee-digits-small-cnn``),
``PCEE_SERVE_STORE_FRACTION``, ``PCEE_SERVE_SHADOW_FRACTION``, ``PCEE_SERVE_ANSWER_MODE``,
``PCEE_SERVE_FALLBACK_URL``, ``PCEE_SERVE_FALLBACK_TIMEOUT_S`` (docs/architecture.md).

The service needs a champion to serve (it refuses to start without one), so it is listed only once
the model has a champion in the MLflow registry, or while it already runs. Before that ``make up``
prints a line saying it is skipped; ``make demo`` starts it after training has registered the
champion.
"""

from __future__ import annotations

import re
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import httpx

from pcee.settings import Settings
from pcee_dev.services.supervisor import Supervisor

NAME = "http"
DEFAULT_MODEL = "pcee-digits-small-cnn"  # what `make demo` trains


def running(cfg) -> list[str]:
    """The HTTP replicas supervisord runs now."""
    pattern = re.compile(rf"{NAME}(-\d+)?")
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


def replica_specs(source_args: list[str], port: int, replicas: int, env: dict[str, str]) -> list[dict]:
    """``replicas`` services serving ``source_args`` (``["--model-name", NAME]`` or ``["--bundle", DIR]``)
    on 127.0.0.1, ports ``port``, ``port + 1``, ..."""
    if port + replicas - 1 > 65535:
        raise SystemExit(f"{NAME}: {replicas} replicas from port {port} need port {port + replicas - 1}, past 65535")
    out = []
    for k in range(1, replicas + 1):
        url = f"http://127.0.0.1:{port + k - 1}"
        out.append(
            {
                "name": replica_name(k),
                # the service reads its other PCEE_SERVE_* options itself (pcee.settings), from the environment
                # it inherits: every replica gets the same model, store (PCEE_TRAFFIC_URL) and options
                "cmd": [
                    sys.executable,
                    "-m",
                    "pcee.cli",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port + k - 1),
                    *source_args,
                ],
                "env": env,
                "health_url": f"{url}/health",
                "url": url,
                "group": 2,
                "startup_timeout": 300.0,  # imports torch and loads the model: minutes on a loaded machine
            }
        )
    return out


def specs(cfg) -> list[dict]:
    settings = Settings()
    model = settings.model_name or DEFAULT_MODEL
    if NAME not in running(cfg) and _champion(cfg, model) is None:
        print(
            f"{NAME}: skipped (no champion of {model} in MLflow yet; `make demo` trains one and starts the service)",
            file=sys.stderr,
        )
        return []
    return replica_specs(["--model-name", model], settings.serve_port, settings.serve_replicas, cfg.client_env())

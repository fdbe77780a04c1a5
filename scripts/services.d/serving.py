"""``make up`` hook: the HTTP service (``python -m pcee.cli serve``) serving ``@champion``.

Environment: ``PCEE_SERVE_PORT`` (default 8000), ``PCEE_MODEL_NAME`` (default
``pcee-digits-small-cnn``), ``PCEE_SERVE_STORE_FRACTION`` (default 0.1: the fraction of inputs
stored for recalibration), ``PCEE_SERVE_POLL_S`` (registry alias poll, default 10 s).
Selective answering (docs/architecture.md): ``PCEE_SERVE_ANSWER_MODE`` (``answer`` | ``abstain`` |
``defer``, default ``abstain``: a request below the champion's answer threshold ρ gets its best guess
flagged ``abstained``), ``PCEE_SERVE_FALLBACK_URL`` (the service ``defer`` forwards to, e.g.
``http://127.0.0.1:8001``; required for ``defer``), ``PCEE_SERVE_FALLBACK_TIMEOUT_S`` (default 2),
``PCEE_SERVE_SHADOW_FRACTION`` (default 0.02: the fraction of requests also run to the final exit,
inputs stored, for label-free recalibration).
Authentication (:mod:`pcee.serving.auth`): ``make up`` generates ``PCEE_SERVE_TOKEN`` once into the
state directory (``serve_token``, 0600) and passes it to the service and to ``env.sh``: writes
(``POST /feedback``) need ``Authorization: Bearer $PCEE_SERVE_TOKEN``, and ``/predict`` too with
``PCEE_SERVE_TOKEN_PREDICT=1``.

The service needs a champion to serve (it refuses to start without one), so it is listed only once
the model has a champion in the MLflow registry, or while it already runs (so that ``down`` and
``status`` still see it). Before that ``make up`` prints a line saying it is skipped; ``make demo``
starts it after training has registered the champion (``services.py up --only http``).

Replicas: ``PCEE_SERVE_REPLICAS=N`` (default 1; 2 under ``PCEE_SCALE_OUT``) starts N identical
processes named ``http``, ``http-2``, ... on ports ``PCEE_SERVE_PORT``, ``PCEE_SERVE_PORT+1``, ...
(all on 127.0.0.1): the same model, the same traffic store (``PCEE_TRAFFIC_URL``; use PostgreSQL
for several writers, SQLite works but its writers take turns), each polling the registry on its
own, so every replica reloads within ``PCEE_SERVE_POLL_S`` of a champion move. Request ids are
uuid4, unique across replicas. Put a load balancer (or round-robin clients) in front of the ports.
Replicas that run but are no longer asked for (N lowered since ``make up``) are still listed, so
``make down`` stops them and ``make status`` shows them.
"""

from __future__ import annotations

import re
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import httpx

from pcee.settings import Settings

NAME = "http"
DEFAULT_MODEL = "pcee-digits-small-cnn"  # what `make demo` trains


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


def replica_name(k: int) -> str:
    """The service name of replica ``k`` (1-based): ``http``, ``http-2``, ``http-3``, ..."""
    return NAME if k == 1 else f"{NAME}-{k}"


def _alive(pid_file: Path) -> bool:
    """The process a PID file ("pid starttime", scripts/services.py) names still runs."""
    try:
        pid, start = pid_file.read_text().split()
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[19] == start
    except (OSError, ValueError, IndexError):
        return False


def _running_replicas(cfg, alive_only: bool = False) -> list[int]:
    """Replica numbers with a PID file (``http.pid`` is 1, ``http-K.pid`` is K)."""
    found = []
    for pid_file in (cfg.state_dir / "pids").glob(f"{NAME}*.pid"):
        m = re.fullmatch(rf"{NAME}(?:-(\d+))?", pid_file.stem)
        if m and (not alive_only or _alive(pid_file)):
            found.append(int(m.group(1) or 1))
    return sorted(found)


def _running(cfg) -> bool:
    return bool(_running_replicas(cfg))


def specs(cfg) -> list[dict]:
    settings = Settings()
    model = settings.model_name or DEFAULT_MODEL
    running = _running_replicas(cfg)
    if not running and _champion(cfg, model) is None:
        print(
            f"{NAME}: skipped (no champion of {model} in MLflow yet; `make demo` trains one and starts the service)",
            file=sys.stderr,
        )
        return []
    # replicas still running from an `up` with a larger N stay listed, so that `down` stops them
    # (only live ones: a stale PID file of a crashed extra replica must not make `up` start it again)
    count = max([settings.serve_replicas, *_running_replicas(cfg, alive_only=True)])
    out = []
    for k in range(1, count + 1):
        port = settings.serve_port + k - 1
        if port > 65535:
            raise SystemExit(
                f"{NAME}: PCEE_SERVE_REPLICAS={settings.serve_replicas} from PCEE_SERVE_PORT={settings.serve_port} "
                f"needs port {port}, past 65535"
            )
        url = f"http://127.0.0.1:{port}"
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
                    str(port),
                    "--model-name",
                    model,
                ],
                "env": cfg.client_env(),
                "health_url": f"{url}/health",
                "url": url,
                "group": 2,
            }
        )
    return out

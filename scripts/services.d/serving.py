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

The service needs a champion to serve (it refuses to start without one), so it is listed only once
the model has a champion in the MLflow registry, or while it already runs (so that ``down`` and
``status`` still see it). Before that ``make up`` prints a line saying it is skipped; ``make demo``
starts it after training has registered the champion (``services.py up --only http``).
"""

from __future__ import annotations

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


def _running(cfg) -> bool:
    return (cfg.state_dir / "pids" / f"{NAME}.pid").is_file()


def specs(cfg) -> list[dict]:
    settings = Settings()
    model = settings.model_name or DEFAULT_MODEL
    if not _running(cfg) and _champion(cfg, model) is None:
        print(
            f"{NAME}: skipped (no champion of {model} in MLflow yet; `make demo` trains one and starts the service)",
            file=sys.stderr,
        )
        return []
    url = f"http://127.0.0.1:{settings.serve_port}"
    return [
        {
            "name": NAME,
            # the service reads its PCEE_SERVE_* options itself (pcee.settings), from the environment it inherits
            "cmd": [sys.executable, "-m", "pcee.cli", "serve", "--host", "127.0.0.1", "--model-name", model],
            "env": cfg.client_env(),
            "health_url": f"{url}/health",
            "url": url,
            "group": 2,
        }
    ]

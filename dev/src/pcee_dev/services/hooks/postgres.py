"""``make up`` hook: PostgreSQL for ``PCEE_DB=postgres`` (or ``PCEE_SCALE_OUT=1``).

Without ``PCEE_POSTGRES_URL``: a local server (:mod:`pcee_dev.postgres`), started before MLflow
(group -1) on 127.0.0.1:``PCEE_POSTGRES_PORT`` (default 5432) with its data, socket and generated
password under ``<state>/postgres/``; its first start runs initdb and creates the role ``pcee`` and
the databases ``pcee_mlflow`` (MLflow's backend store) and ``pcee_traffic`` (the traffic store).
Healthy once ``pcee`` can log in. Stopped with a fast shutdown; ``scripts/services.py restart
postgres`` restarts it (the services reconnect by themselves).

With ``PCEE_POSTGRES_URL`` (an existing server): no process; the two databases are created there if
missing. If the server cannot be reached, ``make up`` fails with a message naming the URL (password
masked): the hook then lists a one-shot "postgres" service that exits with that message, so the
failure goes through ``make up``'s usual path (the message and its log file).
"""

from __future__ import annotations

import sys

from pcee.settings import Settings
from pcee_dev import postgres as pg

NAME = "postgres"


def _never() -> bool:
    return False  # the one-shot failure below is never healthy: make up waits for its exit


def specs(cfg) -> list[dict]:
    settings = Settings()
    if settings.db != "postgres":
        return []
    if settings.postgres_url:
        try:
            pg.ensure_databases(settings.postgres_url)
        except pg.PostgresError as err:
            message = f"{NAME}: {err}"
            print(message, file=sys.stderr)
            return [
                {
                    "name": NAME,
                    "cmd": [sys.executable, "-c", "import sys; sys.exit(sys.argv[1])", message],
                    "health_check": _never,
                    "url": pg.mask_url(settings.postgres_url),
                    "startup_timeout": 30,
                    "group": -1,
                    "restart": False,
                }
            ]
        return []
    server = pg.local_server(settings)
    log = cfg.state_dir / "logs" / f"{NAME}.log"  # supervisord sends the command's output there
    return [
        {
            "name": NAME,
            "cmd": [
                sys.executable,
                "-m",
                "pcee_dev.postgres",
                "serve",
                "--root",
                str(server.root),
                "--port",
                str(server.port),
                "--log",
                str(log),
            ],
            "health_check": server.accepts_role,  # up, and the role and databases exist
            "url": f"postgresql://{pg.ROLE}@{server.host}:{server.port}/{pg.MLFLOW_DB}",
            "startup_timeout": 60,
            "group": -1,
            "stop_timeout": 30,
        }
    ]

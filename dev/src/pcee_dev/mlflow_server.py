"""The command line of an MLflow tracking server on loopback, one place for ``make up``, the tests and
the benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

MLFLOW = Path(sys.executable).parent / "mlflow"  # the venv's entry point


def mlflow_server_cmd(
    port: int, artifacts_destination: str, *, workers: int = 1, backend: str | None = None
) -> list[str]:
    """``mlflow server`` on 127.0.0.1:``port``, proxying artifacts to ``artifacts_destination``.

    ``backend``: the store URI on the command line; leave it None and set ``MLFLOW_BACKEND_STORE_URI``
    in the server's environment where the URI carries a password (a command line is world-readable)."""
    cmd = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if backend is not None:
        cmd += ["--backend-store-uri", backend]
    return [*cmd, "--serve-artifacts", "--artifacts-destination", artifacts_destination]

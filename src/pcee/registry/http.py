"""MLflow's HTTP client, made to fail fast (used by the pipeline's tracking and by serving).

MLflow retries a request with exponential backoff for minutes by default; that would turn
"registry down" into a hung Prefect task, a hung service start-up or a stuck poll thread. The
callers retry themselves (Prefect task retries, the serving poll loop), so MLflow gets one retry
and :data:`MLFLOW_HTTP_TIMEOUT_S` seconds per request.
"""

from __future__ import annotations

import os

#: seconds one MLflow HTTP request may take (``MLFLOW_HTTP_REQUEST_TIMEOUT``; MLflow's default is
#: 120): long enough for a bundle artifact upload on a local server, short enough that an
#: unreachable server fails within seconds
MLFLOW_HTTP_TIMEOUT_S = 15

FAIL_FAST_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(MLFLOW_HTTP_TIMEOUT_S),
}


def fail_fast_http() -> None:
    """Set MLflow's HTTP retry/timeout variables to :data:`FAIL_FAST_ENV` where the environment
    does not set them already (an explicit setting wins)."""
    for key, value in FAIL_FAST_ENV.items():
        os.environ.setdefault(key, value)

"""Shared test setup: quiet, self-contained runs with all state under a temporary directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_STATE = Path(tempfile.mkdtemp(prefix="pcee-test-state-"))
for key, value in {
    "PCEE_STATE_DIR": str(_STATE),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "False",
    "PREFECT_HOME": str(_STATE / "prefect"),
    "MPLCONFIGDIR": str(_STATE / "matplotlib"),
    "DVC_SITE_CACHE_DIR": str(_STATE / "dvc-site-cache"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(key, value)

REPO_ROOT = Path(__file__).resolve().parents[1]

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


import pytest  # noqa: E402

_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _isolate_mlflow_uris():
    """MLflow keeps the tracking/registry URI in module globals and copies it into os.environ
    (``set_tracking_uri``/``set_registry_uri``); a test that points MLflow at its own store must
    not send a later test's ``models:/`` lookups there."""
    saved = {key: os.environ.get(key) for key in _MLFLOW_ENV}
    yield
    import sys

    if "mlflow" in sys.modules:
        import mlflow.tracking._model_registry.utils as registry_utils
        import mlflow.tracking._tracking_service.utils as tracking_utils

        tracking_utils._tracking_uri = None
        registry_utils._registry_uri = None
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

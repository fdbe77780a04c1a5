"""The MLflow client the registry modules share: where the tracking server is, and a client for it.

The tracking URI comes from ``MLFLOW_TRACKING_URI``, else from ``$PCEE_STATE_DIR/services.json``
(written by ``make up``). MLflow's own HTTP retries (minutes of backoff by default) are cut short
so that the Prefect tasks' retries decide, and an unreachable server fails within seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pcee.registry.http import fail_fast_http
from pcee.settings import Settings

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

fail_fast_http()  # fail fast: the caller (a Prefect task) retries


def tracking_uri(settings: Settings | None = None) -> str:
    """The MLflow tracking URI: ``MLFLOW_TRACKING_URI`` or the one ``make up`` recorded."""
    settings = settings or Settings()
    uri = settings.recorded_tracking_uri()
    if uri:
        return uri
    info = settings.state_dir / "services.json"
    raise ValueError(f"no MLflow tracking server: set MLFLOW_TRACKING_URI or run `make up` (no {info})")


def client(settings: Settings | None = None) -> MlflowClient:
    """A client whose registry is the tracking server."""
    from mlflow.tracking import MlflowClient  # mlflow is slow to import; only registry calls need it

    uri = tracking_uri(settings)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def registered_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(m.name for m in client().search_registered_models())

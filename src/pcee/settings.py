"""Every setting pcee reads from the environment, in one frozen model.

The edges (the CLI, the service, the flows and tasks, ``scripts/``) build a :class:`Settings` and
pass what they need inward; the I/O modules (registry, traffic store, DVC, serving's model source)
take an explicit argument and fall back to ``Settings()`` only when called without one. The math
modules (policies, calibration, sweep, models) never read the environment. Variables are the
field names upper-cased with the ``PCEE_`` prefix (``state_dir`` is ``PCEE_STATE_DIR``), plus
``MLFLOW_TRACKING_URI``, MLflow's own name for the tracking server.

``Settings()`` reads the environment each time it is built (cheap), so a test or a child process
that sets a variable sees it; a process that wants one reading for its lifetime keeps the object.
The state directory is resolved once, here: ``PCEE_STATE_DIR`` or ``.pcee`` under the current
directory (``make`` sets ``PCEE_STATE_DIR`` to the repository's ``.pcee``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SynchronousMode = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


class SettingsError(ValueError):
    """An environment variable pcee reads has a value it cannot use; the message names the variable."""


class Settings(BaseSettings):
    """pcee's environment: paths, service URLs and ports, timeouts, defaults of the long-running parts."""

    model_config = SettingsConfigDict(env_prefix="PCEE_", frozen=True, extra="ignore")

    # --- paths
    state_dir: Path = Field(Path(".pcee"), description="services' data, caches, flow runs, the traffic database")
    project_dir: Path = Field(Path("."), description="the DVC/git project the pipeline versions data in")

    # --- services (make up) and where clients find them
    prefect_port: int = Field(4200, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    mlflow_workers: int = Field(1, ge=1)
    mlflow_backend_uri: str | None = Field(
        None, description="MLflow backend store URL; default sqlite in the state dir"
    )
    mlflow_artifacts_destination: str | None = Field(None, description="MLflow artifact root; default the state dir")
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI"), description="default: the one `make up` recorded"
    )
    dvc_remote_url: str | None = Field(None, description="DVC remote; default a directory in the state dir")
    traffic_url: str | None = Field(None, description="traffic store SQLAlchemy URL; default sqlite in the state dir")
    traffic_synchronous: SynchronousMode = "NORMAL"
    traffic_journal: bool = Field(
        True, description="SQLite traffic store: log through an append-only journal drained into the database"
    )

    # --- scale-out (README "Scale-out"): engines past one machine
    scale_out: bool = Field(
        False, description="one switch: db=postgres, artifacts=s3, task_runner=dask, serve_replicas=2 unless set"
    )
    db: Literal["sqlite", "postgres"] = Field("sqlite", description="MLflow backend and traffic store engine")
    postgres_url: str | None = Field(None, description="an existing PostgreSQL server; default one make up starts")
    postgres_port: int = Field(5432, ge=1, le=65535)
    artifacts: Literal["local", "s3"] = Field("local", description="MLflow artifacts and the DVC remote: files or S3")
    s3_endpoint_url: str | None = Field(None, description="an S3 API (AWS or compatible); default one make up starts")
    s3_port: int = Field(9000, ge=1, le=65535)
    s3_bucket: str = "pcee"

    # --- serving
    model_name: str | None = Field(None, description="the registered model the service and the demo use")
    serve_port: int = Field(8000, ge=1, le=65535)
    serve_poll_s: float = Field(10.0, ge=0)
    serve_store_fraction: float = Field(0.1, ge=0, le=1)
    serve_shadow_fraction: float = Field(0.02, ge=0, le=1)
    serve_answer_mode: Literal["answer", "abstain", "defer"] = "abstain"
    serve_fallback_url: str | None = None
    serve_fallback_timeout_s: float = Field(2.0, gt=0)
    serve_replicas: int = Field(1, ge=1, description="HTTP replicas make up starts on consecutive ports")
    serve_device: str = Field("cpu", description="where pcee serve runs the model: cpu, cuda or cuda:<index>")
    serve_graphs: bool = Field(False, description="pcee serve on CUDA: CUDA graphs per segment and batch bucket")
    keep_freed_memory: bool = Field(
        True,
        description="glibc: pcee serve, pcee profile and the train flow's profiling keep freed memory (no page faults per model run)",
    )

    # --- orchestration
    task_runner: Literal["thread", "dask"] = "thread"
    task_workers: int = Field(4, ge=1)
    dask_address: str | None = Field(None, description="an existing Dask scheduler; default a local cluster")
    dask_workers: int = Field(2, ge=1)
    dask_processes: bool = True
    dask_scheduler_port: int = Field(8786, ge=1, le=65535)
    monitor_interval_s: int = Field(60, ge=1)
    nightly_cron: str = "0 2 * * *"
    serve_limit: int = Field(2, ge=1, description="flow runs the deployments process runs at once")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            problems = []
            for e in err.errors():
                field = str(e["loc"][0]) if e["loc"] else "?"
                var = "MLFLOW_TRACKING_URI" if field == "mlflow_tracking_uri" else f"PCEE_{field.upper()}"
                problems.append(f"{var}={e.get('input')!r}: {e['msg']}")
            raise SettingsError("bad pcee setting: " + "; ".join(problems)) from None

    @model_validator(mode="before")
    @classmethod
    def _scale_out_defaults(cls, data: Any) -> Any:
        """``PCEE_SCALE_OUT``: the scaled-out engines, except where a variable says otherwise."""
        if not isinstance(data, dict) or str(data.get("scale_out", "")).strip().lower() not in (
            "1",
            "true",
            "yes",
            "on",
        ):
            return data
        scaled = {"db": "postgres", "artifacts": "s3", "task_runner": "dask", "serve_replicas": 2}
        return {**scaled, **data}

    @field_validator("state_dir", "project_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path.expanduser().resolve()

    @field_validator("traffic_synchronous", "task_runner", mode="before")
    @classmethod
    def _normalise_case(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        value = value.strip()
        return value.upper() if value.lower() in ("off", "normal", "full", "extra") else value.lower()

    def recorded_tracking_uri(self) -> str | None:
        """``MLFLOW_TRACKING_URI``, else the one ``make up`` recorded in ``services.json``, else None."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        info = self.state_dir / "services.json"
        if info.is_file():
            return json.loads(info.read_text()).get("mlflow_tracking_uri")
        return None

    def default_traffic_url(self) -> str:
        """``PCEE_TRAFFIC_URL``, else with ``PCEE_DB=postgres`` the ``pcee_traffic`` database (its password
        read from the state dir, never passed around), else a SQLite file in the state dir."""
        if self.traffic_url:
            return self.traffic_url
        if self.db == "postgres":
            from pcee.stack import postgres  # psycopg only when Postgres is asked for

            return postgres.traffic_url(self)
        return f"sqlite:///{self.state_dir / 'traffic.db'}"

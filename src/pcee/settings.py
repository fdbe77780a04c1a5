"""Every setting pcee reads from the environment, in one frozen model.

The edges (the CLI, the service, the flows and tasks, ``scripts/``) build a :class:`Settings` and
pass what they need inward; the I/O modules (registry, DVC, serving's model source) take an explicit
argument and fall back to ``Settings()`` only when called without one; the traffic store takes its
settings only as an argument (``TrafficStore.from_settings``). The math
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
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SynchronousMode = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


#: the micro-batcher's largest batch on CUDA unless PCEE_SERVE_MAX_BATCH says otherwise: on a CPU a
#: batch's time grows with its rows, so a request waits less in small batches (serve_max_batch's
#: default); on a GPU it grows far less than the rows until the device fills
CUDA_SERVE_MAX_BATCH = 256


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
    serve_host: str = Field("127.0.0.1", description="the HTTP service's bind address")
    serve_port: int = Field(8000, ge=1, le=65535)
    serve_poll_s: float = Field(10.0, ge=0)
    serve_store_fraction: float = Field(0.1, ge=0, le=1)
    serve_shadow_fraction: float = Field(0.02, ge=0, le=1)
    serve_answer_mode: Literal["answer", "abstain", "defer"] = "abstain"
    serve_fallback_url: str | None = None
    serve_fallback_timeout_s: float = Field(2.0, gt=0)
    serve_max_batch: int = Field(64, ge=1, description="samples per model run (micro-batch)")
    serve_max_wait_ms: float = Field(2.0, ge=0, description="wait for more requests after the first of a batch")
    serve_max_body_bytes: int = Field(1_000_000, ge=1024, description="larger /predict bodies get 413 unread")
    serve_max_samples: int = Field(256, ge=1, description="samples in one /predict request")
    serve_seed: int | None = Field(None, description="seed of the input-storage and shadow sampling")
    serve_token: SecretStr | None = Field(
        None, description="bearer token writes (/feedback) need, >= 16 characters; unset: no authentication"
    )
    serve_token_predict: bool = Field(False, description="/predict needs the token too")
    serve_feedback_rate_limit: str = Field(
        "100/second", description="per-client limit on POST /feedback (limits' notation); empty: none"
    )
    serve_replicas: int = Field(
        1, ge=1, description="HTTP replicas make up starts behind its load balancer, on the ports after serve_port"
    )
    serve_stats_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="the load balancer's stats page and metrics; default the port after the last replica",
    )
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
    dask_dashboard_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="the scheduler's HTTP server (/health, /metrics); default dask_scheduler_port + 1",
    )
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
                if field == "serve_token":  # never echo a secret
                    e = {**e, "input": "***"}
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

    @field_validator("serve_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return None
            if len(value) < 16:
                raise ValueError("a token needs at least 16 characters (make up generates one)")
        return value

    @field_validator("serve_fallback_url")
    @classmethod
    def _fallback_url(cls, url: str | None) -> str | None:
        if not url:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(
                f"fallback URL must be an absolute http(s) URL of a pcee service, e.g. http://127.0.0.1:8001, got {url!r}"
            )
        return url

    @field_validator("serve_feedback_rate_limit")
    @classmethod
    def _rate_limit(cls, text: str) -> str:
        from limits import parse_many

        text = text.strip()
        if text:
            try:
                parse_many(text)
            except ValueError:
                raise ValueError(f"not a rate limit: {text!r}; e.g. 100/second or 20/second;1000/minute") from None
        return text

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

    def replica_ports(self) -> list[int]:
        """The ports of the HTTP replicas behind the load balancer on ``serve_port``."""
        return [self.serve_port + k for k in range(1, self.serve_replicas + 1)]

    def stats_port(self) -> int:
        """``serve_stats_port``, else the port after the last replica."""
        return self.serve_stats_port or self.serve_port + self.serve_replicas + 1

    def dask_http_port(self) -> int:
        """``dask_dashboard_port``, else the port after the scheduler's (Dask's own 8786/8787 pairing)."""
        return self.dask_dashboard_port or self.dask_scheduler_port + 1

    def serve_micro_batch(self) -> int:
        """The micro-batcher's largest batch: ``serve_max_batch`` where it is set, else
        :data:`CUDA_SERVE_MAX_BATCH` on CUDA and ``serve_max_batch``'s default elsewhere."""
        if "serve_max_batch" not in self.model_fields_set and self.serve_device.startswith("cuda"):
            return CUDA_SERVE_MAX_BATCH
        return self.serve_max_batch

    def recorded_tracking_uri(self) -> str | None:
        """``MLFLOW_TRACKING_URI``, else the one ``make up`` recorded in ``services.json``, else None."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        info = self.state_dir / "services.json"
        if info.is_file():
            return json.loads(info.read_text()).get("mlflow_tracking_uri")
        return None

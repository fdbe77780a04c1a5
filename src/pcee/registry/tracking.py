"""One MLflow run per pipeline run, registered as a model version (the client: :mod:`pcee.registry.client`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from pcee.registry.client import client, registered_models, tracking_uri
from pcee.registry.fetch import BUNDLE_ARTIFACT

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")


__all__ = ["client", "log_and_register", "registered_name", "resolve_model_name", "tracking_uri"]


def registered_name(data: str, model: str) -> str:
    """``pcee-<data>-<model>``, with the data name reduced to a registry-safe token."""
    base = data.split(":", 1)[0] if not data.startswith("prepared:") else Path(data.split(":", 1)[1]).name or "prepared"
    token = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in base).strip("-") or "data"
    return f"pcee-{token}-{model}"


def resolve_model_name(name: str | None) -> str:
    """``name``, or the only registered ``pcee-*`` model (ValueError naming them when there are several or none)."""
    if name:
        return name
    names = [n for n in registered_models() if n.startswith("pcee-")]
    if len(names) != 1:
        raise ValueError(f"pass --name: the registry holds {len(names)} pcee models {names}")
    return names[0]


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _metric_key(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_./ " else "_" for ch in name)


def log_and_register(
    *,
    experiment: str,
    run_name: str,
    model_name: str,
    bundle_dir: str | os.PathLike,
    params: dict[str, Any],
    metrics: dict[str, float],
    tags: dict[str, str],
    artifacts: dict[str, str | os.PathLike] | None = None,
    sweep_rows: list[dict[str, Any]] | None = None,
    description: str | None = None,
) -> tuple[str, str]:
    """Log one run (params, metrics, artifact files/dirs, the pyfunc model) and register it.

    Returns (run_id, model version). Tags go on the run and on the model version; ``description``
    (one paragraph: what the version is, its data and operating point) on the model version.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in params.items()})
        finite = {_metric_key(k): float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        mlflow.log_metrics(finite)
        mlflow.set_tags(tags)
        if sweep_rows:
            import pandas as pd

            mlflow.log_table(pd.DataFrame(sweep_rows), artifact_file="sweep/sweep_table.json")
        for dest, path in (artifacts or {}).items():
            path = Path(path)
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=dest)
            elif path.is_file():
                mlflow.log_artifact(str(path), artifact_path=dest)
        import mlflow.pyfunc

        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            registered_model_name=model_name,
            # explicit requirements: inferring them would load the model in a subprocess
            pip_requirements=[f"mlflow=={mlflow.__version__}", "torch", "numpy", "pandas", "pcee"],
        )
        version = str(info.registered_model_version)
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(model_name, version, key, str(value))
    if description:
        c.update_model_version(model_name, version, description=description)
    return run.info.run_id, version

"""MLflow tasks: log + register, read aliases, fetch and evaluate a version, move aliases."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from pcee.bundle import ModelBundle
from pcee.registry import aliases, set_challenger
from pcee.registry import log_and_register as _log
from pcee.registry import promote as _promote
from pcee.registry.evaluate import evaluate_bundle as _evaluate
from pcee.registry.fetch import fetch_bundle as _fetch
from pcee.registry.tracking import client
from pcee.registry.tracking import resolve_model_name as _resolve
from tasks import IO_RETRIES, IO_RETRY_DELAY_S


@task(name="mlflow-log-and-register", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def log_and_register(**kwargs) -> dict:

    run_id, version = _log(**kwargs)
    set_challenger(kwargs["model_name"], version)
    get_run_logger().info("registered %s version %s as challenger (run %s)", kwargs["model_name"], version, run_id)
    return {"run_id": run_id, "version": version}


@task(name="read-aliases", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def read_aliases(name: str) -> dict:
    from mlflow.exceptions import MlflowException

    try:
        return aliases(name)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or "not found" in str(err).lower():
            return {"challenger": None, "champion": None, "previous": None}
        raise


@task(name="resolve-model-name", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def resolve_model_name(name: str | None) -> str:
    """``name``, or the only registered ``pcee-*`` model."""

    return _resolve(name)


@task(name="version-tags", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def version_tags(name: str, version: str) -> dict:

    return dict(client().get_model_version(name, version).tags)


@task(name="fetch-bundle", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def fetch_bundle(name: str, version: str, dst: str) -> str:

    path = _fetch(name, version, Path(dst))
    get_run_logger().info("fetched %s version %s to %s", name, version, path)
    return str(path)


@task(name="load-bundle")
def load_bundle(bundle_dir: str):
    """The :class:`pcee.bundle.ModelBundle` in ``bundle_dir`` (model, policy, FLOPs, meta)."""

    return ModelBundle.load(bundle_dir)


@task(name="evaluate-bundle")
def evaluate_bundle(
    bundle_dir: str,
    x,
    y,
    version: str | None,
    risk: float | None = None,
    bound: str | None = None,
    test_x=None,
    test_y=None,
):
    """Accuracy (and its lower bound) and mean FLOPs of a bundle's early-exit runner on the gate rows;
    test accuracy as a check."""

    ev = _evaluate(bundle_dir, x, y, version, risk=risk, bound=bound, test_x=test_x, test_y=test_y)
    get_run_logger().info(
        "version %s: accuracy %.4f (lower bound %s), mean FLOPs %.0f on %d gate rows; test accuracy (check) %s",
        version,
        ev.accuracy,
        ev.accuracy_lower_bound,
        ev.mean_flops,
        ev.n,
        ev.test_accuracy,
    )
    return ev


@task(name="promote", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def promote(name: str, version: str) -> dict:

    result = _promote(name, version)
    get_run_logger().info("%s: champion -> %s (aliases %s)", name, version, result)
    return result


@task(name="tag-gate-decision", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def tag_decision(name: str, version: str, decision: dict, description: str | None = None) -> None:
    """Tag the gate's decision on the version; ``description`` (with the gate result) replaces its description."""

    c = client()
    c.set_model_version_tag(name, version, "gate", "promoted" if decision["promote"] else "rejected")
    c.set_model_version_tag(name, version, "gate_reason", decision["reason"][:5000])
    if description is not None:
        c.update_model_version(name, version, description=description)

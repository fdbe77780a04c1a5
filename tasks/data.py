"""Data tasks: version the snapshot with DVC, load it, validate it with Great Expectations."""

from __future__ import annotations

from prefect import get_run_logger, task

from pcee.data.datasets import load_dataset
from pcee.dvc_repo import resolve_data_dir
from pcee.dvc_repo import version_data as _version
from pcee.validation import validate_dataset
from tasks import IO_RETRIES, IO_RETRY_DELAY_S


@task(name="version-data", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def version_data(data_dir: str) -> dict:
    """``dvc add`` + ``dvc push`` the snapshot (inside the project) and return its md5."""

    info = _version(data_dir)
    get_run_logger().info("data %s md5 %s (remote %s)", info["path"], info["md5"], info["remote"] or "-")
    return info


@task(name="load-data", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def load_data(data_dir: str):

    splits = load_dataset(f"prepared:{resolve_data_dir(data_dir)}")
    get_run_logger().info(
        "loaded %s: sizes %s, input %s, %d classes", splits.name, splits.sizes(), splits.input_shape, splits.num_classes
    )
    return splits


@task(name="validate-data")
def validate_data(splits) -> dict:
    """The GX dataset suite; a failure raises ``ValidationFailed`` naming the failing expectations."""

    report = validate_dataset(splits)
    get_run_logger().info("GX suite %s: %d expectations passed", report.suite, len(report.results))
    return report.to_dict()

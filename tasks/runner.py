"""The Prefect task runner for the pipeline's fan-out, chosen by setting.

``PCEE_TASK_RUNNER=thread`` (default): ``ThreadPoolTaskRunner`` (``PCEE_TASK_WORKERS``, default 4).
``PCEE_TASK_RUNNER=dask``: ``prefect_dask.DaskTaskRunner`` on ``PCEE_DASK_ADDRESS`` (an existing
scheduler, e.g. ``tcp://10.0.0.5:8786``) or, without one, a local cluster
(``PCEE_DASK_WORKERS`` workers, default 2; ``PCEE_DASK_PROCESSES=false`` for threads).
"""

from __future__ import annotations

import os

TASK_RUNNERS = ("thread", "dask")


def make_task_runner():
    kind = os.environ.get("PCEE_TASK_RUNNER", "thread").strip().lower()
    if kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=int(os.environ.get("PCEE_TASK_WORKERS", "4")))
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise ValueError("PCEE_TASK_RUNNER=dask needs the 'dask' extra: uv sync --extra dask") from err
        address = os.environ.get("PCEE_DASK_ADDRESS")
        if address:
            return DaskTaskRunner(address=address)
        processes = os.environ.get("PCEE_DASK_PROCESSES", "true").lower() not in ("0", "false", "no")
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": int(os.environ.get("PCEE_DASK_WORKERS", "2")), "threads_per_worker": 1,
                            "processes": processes, "dashboard_address": None}
        )
    raise ValueError(f"PCEE_TASK_RUNNER={kind!r} is not a task runner; valid: {', '.join(TASK_RUNNERS)}")

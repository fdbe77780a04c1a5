"""The Prefect task runner for the pipeline's fan-out, chosen by setting.

``PCEE_TASK_RUNNER=thread`` (default): ``ThreadPoolTaskRunner`` (``PCEE_TASK_WORKERS``, default 4).
``PCEE_TASK_RUNNER=dask``: ``prefect_dask.DaskTaskRunner`` on ``PCEE_DASK_ADDRESS`` (an existing
scheduler, e.g. ``tcp://10.0.0.5:8786``) or, without one, a local cluster
(``PCEE_DASK_WORKERS`` workers, default 2; ``PCEE_DASK_PROCESSES=false`` for threads).
"""

from __future__ import annotations

from pcee.settings import Settings

TASK_RUNNERS = ("thread", "dask")


def make_task_runner(settings: Settings | None = None):
    """The task runner ``settings`` (default: the environment, :mod:`pcee.settings`) ask for."""
    s = settings or Settings()
    if s.task_runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=s.task_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise ValueError("PCEE_TASK_RUNNER=dask needs the 'dask' extra: uv sync --extra dask") from err
    if s.dask_address:
        return DaskTaskRunner(address=s.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": s.dask_workers,
            "threads_per_worker": 1,
            "processes": s.dask_processes,
            "dashboard_address": None,
        }
    )

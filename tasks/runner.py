"""The Prefect task runner for the pipeline's fan-out, chosen by setting.

``PCEE_TASK_RUNNER=thread`` (default): ``ThreadPoolTaskRunner`` (``PCEE_TASK_WORKERS``, default 4).
``PCEE_TASK_RUNNER=dask``: ``prefect_dask.DaskTaskRunner`` on ``PCEE_DASK_ADDRESS`` (an existing
scheduler, e.g. ``tcp://10.0.0.5:8786``, or the one ``make up`` starts) or, without one, a local
cluster (``PCEE_DASK_WORKERS`` workers, default 2; ``PCEE_DASK_PROCESSES=false`` for threads).

A scheduler that does not answer within ``CONNECT_TIMEOUT_S`` fails the flow run (state Failed)
with :class:`pcee.stack.dask.DaskUnreachable`, which names the address, instead of Dask's 30 s
timeout and bare error; one lost during the fan-out, with :class:`pcee.stack.dask.DaskSchedulerLost`
(Dask cancels the futures at once; its error does not say which scheduler). The runner connects when the flow first uses it: at its first ``.submit``,
or earlier where the flow calls :func:`connect_task_runner` (before any expensive step). Nothing is
checked when the runner is built: the flows build theirs when their module is imported, and
importing a flow must not need the cluster. Nor when Prefect enters it: an error there leaves the
flow run Running in the Prefect API, where an error in the flow's body marks it Failed.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import TYPE_CHECKING, Any

from pcee.settings import Settings
from pcee.stack.dask import DaskSchedulerLost, DaskUnreachable

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

TASK_RUNNERS = ("thread", "dask")
CONNECT_TIMEOUT_S = 5.0  # a scheduler's answer to a connect (Dask's default: 30 s)


@cache
def _dask_task_runner_class() -> type:
    """``DaskTaskRunner`` whose failure to connect names the scheduler (a class made once, on first
    use: prefect-dask is an optional extra)."""
    from concurrent.futures import CancelledError

    from prefect_dask.task_runners import DaskTaskRunner, PrefectDaskFuture

    class NamedDaskFuture(PrefectDaskFuture):
        """A task's future whose error names the scheduler when the scheduler is lost (Dask cancels
        every future at once: "cancelled for reason: scheduler-connection-lost", no address)."""

        address = ""

        def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
            try:
                return super().result(timeout=timeout, raise_on_failure=raise_on_failure)
            except CancelledError as err:
                if "connection-lost" not in str(err):
                    raise
                raise DaskSchedulerLost(self.address, f"task run {self.task_run_id}", err) from None

    class PceeDaskTaskRunner(DaskTaskRunner):
        def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
            future = super().submit(task, parameters, wait_for, dependencies)
            if not self.address:
                return future
            named = NamedDaskFuture(wrapped_future=future.wrapped_future, task_run_id=future.task_run_id)
            named.address = self.address
            return named

        @property
        def client(self) -> Any:
            try:
                return super().client
            except (OSError, TimeoutError) as err:  # Dask: "Timed out trying to connect to ..."
                if not self.address or isinstance(err, DaskUnreachable):
                    raise
                raise DaskUnreachable(self.address, CONNECT_TIMEOUT_S, err) from None

    # named as the class it extends: what it is, to Prefect's logs and to callers checking the kind
    PceeDaskTaskRunner.__name__ = PceeDaskTaskRunner.__qualname__ = "DaskTaskRunner"
    PceeDaskTaskRunner.__module__ = __name__
    return PceeDaskTaskRunner


def make_task_runner(settings: Settings | None = None) -> TaskRunner[Any]:
    """The task runner ``settings`` (default: the environment, :mod:`pcee.settings`) ask for."""
    s = settings or Settings()
    if s.task_runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=s.task_workers)
    try:
        runner_class = _dask_task_runner_class()
    except ImportError as err:
        raise ValueError("PCEE_TASK_RUNNER=dask needs the 'dask' extra: uv sync --extra dask") from err
    if s.dask_address:
        return runner_class(address=s.dask_address, client_kwargs={"timeout": CONNECT_TIMEOUT_S})
    return runner_class(
        cluster_kwargs={
            "n_workers": s.dask_workers,
            "threads_per_worker": 1,
            "processes": s.dask_processes,
            "dashboard_address": None,
        }
    )


def connect_task_runner() -> None:
    """Inside a flow: connect the flow's Dask task runner now (a no-op for the thread pool), so that
    a scheduler that is gone fails the flow run at its start, naming the address, rather than at the
    fan-out after the expensive steps. The connection is the one the fan-out then uses."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or "prefect_dask" not in sys.modules:  # not in a flow, or no Dask runner can exist
        return
    from prefect_dask.task_runners import DaskTaskRunner

    if isinstance(ctx.task_runner, DaskTaskRunner):
        ctx.task_runner.client  # noqa: B018 - the property connects (prefect-dask connects lazily)

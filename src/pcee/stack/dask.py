"""The Dask scheduler the pipeline's fan-out uses (``PCEE_TASK_RUNNER=dask``): its address, what a
client needs in its environment, and the probe the task runner (``tasks/runner.py``) runs before a
flow uses a scheduler, so that a scheduler that is gone fails the flow at once, naming its address,
instead of after a 30 s connect timeout in the middle of the fan-out. No process is started here
(the development tools' ``pcee_dev.dask`` runs the scheduler and workers for ``make up``).

Standard library and ``distributed`` only (imported lazily).
"""

from __future__ import annotations

from typing import Any

from pcee.settings import Settings

HOST = "127.0.0.1"  # the scheduler make up starts listens on the loopback interface only


class DaskUnreachable(ConnectionError):
    """No Dask scheduler answered at an address; the message names it."""

    def __init__(self, address: str, timeout: float, cause: BaseException | str) -> None:
        self.address = address
        super().__init__(
            f"Dask scheduler {address} not reachable within {timeout:g} s ({cause}); "
            "start it (make up with PCEE_TASK_RUNNER=dask) or fix PCEE_DASK_ADDRESS"
        )


class DaskSchedulerLost(ConnectionError):
    """The Dask scheduler at an address went away while a flow's tasks were on it."""

    def __init__(self, address: str, what: str, cause: BaseException | str) -> None:
        self.address = address
        super().__init__(f"Dask scheduler {address} lost while {what} ran ({cause}); its result is unknown")


def scheduler_address(settings: Settings | None = None) -> str:
    """``PCEE_DASK_ADDRESS`` if given, else the scheduler ``make up`` starts (``PCEE_DASK_SCHEDULER_PORT``)."""
    s = settings or Settings()
    return s.dask_address or f"tcp://{HOST}:{s.dask_scheduler_port}"


def client_env(settings: Settings | None = None) -> dict[str, str]:
    """What a client of the cluster ``make up`` runs needs (the serve process, a flow, ``env.sh``):
    the runner kind and the scheduler's address; empty unless ``PCEE_TASK_RUNNER=dask``."""
    s = settings or Settings()
    if s.task_runner != "dask":
        return {}
    return {"PCEE_TASK_RUNNER": "dask", "PCEE_DASK_ADDRESS": scheduler_address(s)}


def check_scheduler(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """The scheduler's ``scheduler_info()`` (its ``workers``: address -> info with ``name``), or
    :class:`DaskUnreachable` naming ``address`` when it does not answer within ``timeout`` s."""
    from distributed import Client

    try:
        with Client(address, timeout=timeout, set_as_default=False) as client:
            return dict(client.scheduler_info(n_workers=-1))
    except (OSError, TimeoutError, ValueError) as err:  # ValueError: an address Dask cannot parse
        raise DaskUnreachable(address, timeout, err) from None

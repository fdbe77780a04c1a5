"""``make up`` hook: a Dask cluster for the flows' fan-out when ``PCEE_TASK_RUNNER=dask``
(or ``PCEE_SCALE_OUT=1``) and no ``PCEE_DASK_ADDRESS`` names an existing scheduler.

- ``dask-scheduler`` (group -1): ``dask scheduler`` on 127.0.0.1:``PCEE_DASK_SCHEDULER_PORT``
  (default 8786), no dashboard, its HTTP server (``/health``, ``/metrics``) on
  127.0.0.1:``PCEE_DASK_DASHBOARD_PORT`` (default the scheduler's port + 1); healthy once it answers
  a client.
- ``dask-worker-0`` .. ``dask-worker-<N-1>`` (group 0, beside Prefect and MLflow):
  ``PCEE_DASK_WORKERS`` (default 2) ``dask worker`` processes, one thread each, listening on
  127.0.0.1, scratch space in ``<state>/dask/``, the fan-out's modules preloaded (``PRELOAD``);
  healthy once registered with the scheduler. They run the Prefect tasks, so they get the clients'
  environment (Prefect API, MLflow, state dir). supervisord restarts any of them that dies; a
  restarted worker registers again under its name.

Clients (the serve process, flows run by hand) find the scheduler through ``PCEE_DASK_ADDRESS``
(:func:`pcee.stack.dask.client_env`). With ``PCEE_DASK_ADDRESS`` set, nothing is started: the flows
use that scheduler (whose workers must have this project installed and reach the Prefect API).
"""

from __future__ import annotations

from pcee.settings import Settings
from pcee_dev import dask as D

SCHEDULER = "dask-scheduler"
# imported by each worker as it starts (beside Prefect's and MLflow's start-up), not by the first
# fan-out: Prefect's task engine, the fan-out's task module and what it imports (torch: ~5 s)
PRELOAD = ("prefect.task_engine", "tasks.calibrate", "pcee.latency", "pcee.operating_point", "pcee.sweep")


def specs(cfg) -> list[dict]:
    s = Settings()
    if s.task_runner != "dask" or s.dask_address:
        return []
    address = f"tcp://{D.HOST}:{s.dask_scheduler_port}"  # the one this hook starts
    out: list[dict] = [
        {
            "name": SCHEDULER,
            "cmd": D.scheduler_cmd(s.dask_scheduler_port, http_port=s.dask_http_port()),
            "health_check": lambda: D.scheduler_reachable(address),
            "url": address,
            "startup_timeout": 60.0,
            "group": -1,
        }
    ]
    for name in D.worker_names(s.dask_workers):
        out.append(
            {
                "name": name,
                # the Dask worker name is the service name: unique per scheduler, and what the health check looks for
                "cmd": D.worker_cmd(
                    address, name, nthreads=1, local_directory=cfg.state_dir / "dask" / name, preload=PRELOAD
                ),
                "env": {**cfg.client_env(), **D.client_env(s)},
                "health_check": lambda name=name: D.worker_connected(address, name),
                "startup_timeout": 60.0,
                "group": 0,
            }
        )
    return out

"""The local Dask cluster of the scaled-out stack (development tools: ``make up``, tests): a
``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, their commands, health checks and
:class:`LocalDaskCluster`. The library keeps the address and the probe (:mod:`pcee.stack.dask`,
re-exported here).

Every socket is on the loopback interface: the scheduler's RPC port (``PCEE_DASK_SCHEDULER_PORT``)
and its HTTP server (``/health``, ``/metrics``; Dask starts it even with ``--no-dashboard``) on
``PCEE_DASK_DASHBOARD_PORT``, each worker's RPC and HTTP ports on 127.0.0.1 (ports the kernel picks:
workers are many, and the scheduler tells clients where they are).

Standard library and ``distributed`` only (imported lazily: ``make up`` lists its services fast).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

# the address and the probe are the library's (pcee.stack.dask), re-exported beside the launchers
from pcee.stack.dask import (
    HOST,
    DaskSchedulerLost,
    DaskUnreachable,
    check_scheduler,
    client_env,
    scheduler_address,
)
from pcee_dev.proc import spawn, stop_group, tail

__all__ = [
    "HOST",
    "DaskSchedulerLost",
    "DaskUnreachable",
    "check_scheduler",
    "client_env",
    "scheduler_address",
    "LocalDaskCluster",
    "WORKER_PREFIX",
    "cluster_ready",
    "connected_workers",
    "scheduler_cmd",
    "scheduler_reachable",
    "worker_cmd",
    "worker_connected",
    "worker_names",
]

WORKER_PREFIX = "dask-worker"  # worker i is "dask-worker-i": its Dask name and its make up service name


def worker_names(n: int) -> list[str]:
    """The names ``make up`` gives its workers (unique per scheduler: Dask refuses a duplicate name)."""
    return [f"{WORKER_PREFIX}-{i}" for i in range(n)]


def scheduler_cmd(
    port: int, scheduler_file: Path | None = None, python: str = sys.executable, http_port: int = 0
) -> list[str]:
    """``dask scheduler`` on 127.0.0.1:``port`` without a dashboard (``port`` 0: any free port,
    written to ``scheduler_file``); its HTTP server (``/health``, ``/metrics``) on
    127.0.0.1:``http_port`` (0: any free port; Dask's default is 0.0.0.0:8787). ``python -m``: the
    venv's interpreter, whatever is on PATH."""
    cmd = [
        python,
        "-m",
        "distributed.cli.dask_scheduler",
        "--host",
        HOST,
        "--port",
        str(port),
        "--no-dashboard",
        "--dashboard-address",
        f"{HOST}:{http_port}",
    ]
    if scheduler_file is not None:
        cmd += ["--scheduler-file", str(scheduler_file)]
    return cmd


def worker_cmd(
    address: str,
    name: str,
    nthreads: int = 1,
    local_directory: Path | None = None,
    preload: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """``dask worker`` connected to ``address``, listening on 127.0.0.1 (a random port).

    ``--no-nanny``: one process per worker, so the process ``make up`` records is the one running
    the tasks and ``make down`` stops exactly it; ``services.py`` already supervises processes.
    ``preload``: modules the worker imports before it registers (``--preload``), so that the first
    task does not pay for them (Prefect and torch: seconds).
    """
    cmd = [
        python,
        "-m",
        "distributed.cli.dask_worker",
        address,
        "--host",
        HOST,
        "--nthreads",
        str(nthreads),
        "--no-dashboard",
        "--dashboard-address",
        f"{HOST}:0",  # its HTTP server (/health, /metrics) on loopback too (Dask's default: all interfaces)
        "--no-nanny",
        "--name",
        name,
    ]
    if local_directory is not None:  # spill files and the worker's scratch space (default: the temp dir)
        cmd += ["--local-directory", str(local_directory)]
    for module in preload:
        cmd += ["--preload", module]
    return cmd


def connected_workers(address: str, timeout: float = 2.0) -> list[str]:
    """Names of the workers connected to the scheduler at ``address`` ([] if it does not answer)."""
    try:
        info = check_scheduler(address, timeout)
    except DaskUnreachable:
        return []
    return sorted(str(w.get("name")) for w in info.get("workers", {}).values())


def scheduler_reachable(address: str, timeout: float = 2.0) -> bool:
    """A health check for ``make up``: True once the scheduler answers (never raises)."""
    try:
        check_scheduler(address, timeout)
    except DaskUnreachable:
        return False
    return True


def worker_connected(address: str, name: str, timeout: float = 2.0) -> bool:
    """A health check for ``make up``: True once the worker ``name`` is registered with the scheduler."""
    return name in connected_workers(address, timeout)


def cluster_ready(address: str, n_workers: int, timeout: float = 2.0) -> bool:
    """True once the scheduler answers with at least ``n_workers`` workers connected."""
    try:
        info = check_scheduler(address, timeout)
    except DaskUnreachable:
        return False
    return len(info.get("workers", {})) >= n_workers


class LocalDaskCluster:
    """A scheduler and ``n_workers`` worker processes on 127.0.0.1, each in its own process group,
    logging to ``log_dir``; the same commands ``make up`` runs. A context manager: the processes
    are stopped on exit, also when starting failed.

    ``port`` 0 (default) lets the scheduler pick a free port (read back from its scheduler file):
    no race with other processes allocating ports. ``env``: added to the workers' environment
    (the Prefect API and MLflow a task reports to); ``preload``: as :func:`worker_cmd`."""

    def __init__(
        self,
        log_dir: Path,
        n_workers: int = 2,
        port: int = 0,
        env: Mapping[str, str] | None = None,
        preload: Sequence[str] = (),
        startup_timeout: float = 60.0,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.n_workers = n_workers
        self.port = port
        self.env = dict(env or {})
        self.preload = tuple(preload)
        self.startup_timeout = startup_timeout
        self.address = ""
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    @property
    def worker_pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.workers.items()}

    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str]) -> subprocess.Popen:
        return spawn(cmd, self.log_dir / f"{name}.log", {**os.environ, **env})  # own process group

    def _fail(self, what: str) -> None:
        logs = "\n".join(f"--- {p}:\n{tail(p, 20)}" for p in sorted(self.log_dir.glob("*.log")))
        self.stop()
        raise RuntimeError(f"Dask cluster {self.address or '(scheduler not up)'}: {what}\n{logs}")

    def _check_alive(self) -> None:
        for name, proc in [("scheduler", self.scheduler), *self.workers.items()]:
            if proc is not None and proc.poll() is not None:
                self._fail(f"{name} exited with code {proc.returncode} while starting (logs in {self.log_dir})")

    def start(self) -> LocalDaskCluster:
        deadline = time.monotonic() + self.startup_timeout
        sched_file = self.log_dir / "scheduler.json"
        sched_file.unlink(missing_ok=True)
        self.scheduler = self._spawn("scheduler", scheduler_cmd(self.port, sched_file), {})
        while not self.address:
            self._check_alive()
            try:
                self.address = json.loads(sched_file.read_text())["address"]
            except (OSError, ValueError, KeyError):  # not written yet, or half written
                if time.monotonic() > deadline:
                    self._fail(f"no scheduler file {sched_file} after {self.startup_timeout:.0f} s")
                time.sleep(0.1)
        for name in worker_names(self.n_workers):
            self.workers[name] = self._spawn(name, worker_cmd(self.address, name, preload=self.preload), self.env)
        while not cluster_ready(self.address, self.n_workers):
            self._check_alive()
            if time.monotonic() > deadline:
                self._fail(f"{self.n_workers} workers not connected after {self.startup_timeout:.0f} s")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        """Workers first (they would otherwise try to reconnect), then the scheduler."""
        for proc in [*self.workers.values(), self.scheduler]:
            if proc is not None:
                stop_group(proc, timeout=5.0)

    def __enter__(self) -> LocalDaskCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

#!/usr/bin/env python
"""Start, stop and inspect pcee's local services: ``make up`` / ``make down`` / ``make status``.

Services (all on 127.0.0.1, all state under ``$PCEE_STATE_DIR``, default ``.pcee/``):

- ``prefect``: a real ``prefect server start`` (port ``PCEE_PREFECT_PORT``, default 4200);
- ``mlflow``: a real ``mlflow server`` (port ``PCEE_MLFLOW_PORT``, default 5000) with a sqlite
  backend in the state dir (``PCEE_MLFLOW_BACKEND_URI`` for any SQLAlchemy URL, e.g. Postgres)
  and proxied artifacts in the state dir (``PCEE_MLFLOW_ARTIFACTS_DESTINATION``, e.g. ``s3://...``);
- ``serve``: one process serving the Prefect deployments (``flows/serve.py``).

Each service runs in its own process group, logs to ``<state>/logs/<name>.log`` and has a PID
file ``<state>/pids/<name>.pid`` ("pid starttime"), so ``down`` stops exactly what ``up`` started
and a recycled PID is never signalled. ``up`` is idempotent: a service that is running and healthy
is left alone. ``up`` also writes ``<state>/services.json`` (URLs) and ``<state>/env.sh``: ``source`` it
and ``uv run prefect deployment run ...`` talks to the server. Nothing is written outside the state
directory (no ``prefect.toml`` in the checkout: Prefect reads that file from every process's working
directory, so one appearing and vanishing under a running test suite raced with its Prefect clients).

Hook for other parts: every ``scripts/services.d/*.py`` defining ``specs(cfg) -> list[dict]``
adds services (dict keys as :class:`ServiceSpec`; started after the built-in ones, in file order).

Only the standard library and httpx are imported, so this starts fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: prefect, mlflow
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "False",
    "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # else mlflow server forks ~7 job workers (~2 GB)
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class ServiceSpec:
    """One long-running process: its command, extra environment and how to tell it is healthy."""

    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None  # GET must answer 2xx
    health_check: Callable[[], bool] | None = None  # or any predicate
    url: str | None = None  # shown by `status`, written to services.json
    startup_timeout: float = 120.0
    group: int = 1  # services of one group start together; group g+1 starts once group g is healthy


@dataclass(frozen=True)
class Config:
    state_dir: Path
    prefect_port: int
    mlflow_port: int
    mlflow_backend_uri: str
    mlflow_artifacts_destination: str
    mlflow_workers: int
    # the MLflow server's own environment beyond QUIET_ENV (S3 endpoint and credentials)
    mlflow_env: dict[str, str] = field(default_factory=dict)
    # what clients need beyond the service URLs (S3 endpoint and credentials, the Dask scheduler)
    client_extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def client_env(self) -> dict[str, str]:
        """What a client (a flow, the serve process, a test) needs to reach the services."""
        return {
            "PCEE_STATE_DIR": str(self.state_dir),
            "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(self.state_dir / "prefect")),
            "PREFECT_API_URL": self.prefect_api_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            # the registry is the tracking server; an inherited MLFLOW_REGISTRY_URI must not win
            "MLFLOW_REGISTRY_URI": self.mlflow_url,
            "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", str(self.state_dir / "matplotlib")),
            "DVC_SITE_CACHE_DIR": os.environ.get("DVC_SITE_CACHE_DIR", str(self.state_dir / "dvc-site-cache")),
            **self.client_extra_env,
        }


def load_config() -> Config:
    """The services' configuration from the environment (:mod:`pcee.settings`); a bad value stops ``make up``."""
    from pcee.settings import Settings, SettingsError

    try:
        s = Settings()
    except SettingsError as err:
        raise SystemExit(str(err)) from None
    backend = s.mlflow_backend_uri
    if backend is None and s.db == "postgres":
        from pcee.stack import postgres

        backend = postgres.mlflow_backend_uri(s)  # the pcee_mlflow database (password from the state dir)
    artifacts = s.mlflow_artifacts_destination
    mlflow_env: dict[str, str] = {}
    client_extra_env: dict[str, str] = {}
    if s.artifacts == "s3":
        from pcee.stack import s3

        artifacts = artifacts or s3.artifacts_destination(s)  # s3://<bucket>/mlflow
        s3_env = s3.client_env(s)  # endpoint and credentials
        mlflow_env.update(s3_env)  # the server proxies artifacts
        client_extra_env.update(s3_env)  # DVC's S3 remote in the flows
    if s.serve_token is None:  # the HTTP service and its clients share a token generated once (0600, state dir)
        from pcee.serving.auth import ensure_token_file

        client_extra_env["PCEE_SERVE_TOKEN"] = ensure_token_file(s.state_dir)
    if s.task_runner == "dask" and not s.dask_address:
        from pcee.stack import dask

        client_extra_env.update(dask.client_env(s))  # the scheduler services.d/dask.py starts
    return Config(
        state_dir=s.state_dir,
        prefect_port=s.prefect_port,
        mlflow_port=s.mlflow_port,
        mlflow_backend_uri=backend or f"sqlite:///{s.state_dir / 'mlflow' / 'mlflow.db'}",
        mlflow_artifacts_destination=artifacts or str(s.state_dir / "mlflow" / "artifacts"),
        mlflow_workers=s.mlflow_workers,
        mlflow_env=mlflow_env,
        client_extra_env=client_extra_env,
    )


def _deployment_exists(cfg: Config, name: str) -> Callable[[], bool]:
    def check() -> bool:
        # serve pauses its deployments when it stops and resumes them when it (re)registers them
        r = httpx.get(f"{cfg.prefect_api_url}/deployments/name/{name}", timeout=5)
        return r.status_code == 200 and not r.json().get("paused", False)

    return check


def builtin_specs(cfg: Config) -> list[ServiceSpec]:
    prefect_env = {"PREFECT_HOME": cfg.client_env()["PREFECT_HOME"], "PREFECT_API_URL": ""}
    return [
        ServiceSpec(
            name="prefect",
            cmd=[str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(cfg.prefect_port)],
            env=prefect_env,
            health_url=f"{cfg.prefect_api_url}/health",
            url=f"http://127.0.0.1:{cfg.prefect_port}",
            group=0,
        ),
        ServiceSpec(
            name="mlflow",
            cmd=[
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(cfg.mlflow_port),
                "--workers",
                str(cfg.mlflow_workers),
                "--serve-artifacts",
                "--artifacts-destination",
                cfg.mlflow_artifacts_destination,
            ],
            # by environment, not argument: a database password stays out of `ps` and the log's "starting:" line
            env={"MLFLOW_BACKEND_STORE_URI": cfg.mlflow_backend_uri, **cfg.mlflow_env},
            health_url=f"{cfg.mlflow_url}/health",
            url=cfg.mlflow_url,
            group=0,
        ),
        ServiceSpec(
            name="serve",
            cmd=[sys.executable, "-m", "flows.serve"],
            env=cfg.client_env(),
            health_check=_deployment_exists(cfg, "train/manual"),
        ),
    ]


def extra_specs(cfg: Config) -> list[ServiceSpec]:
    """Services contributed by other parts (serving, monitoring) in scripts/services.d/*.py."""
    specs = []
    for path in sorted((REPO / "scripts" / "services.d").glob("*.py")):
        mod_spec = importlib.util.spec_from_file_location(f"pcee_services_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module  # dataclasses in it look their module up
        mod_spec.loader.exec_module(module)
        for d in module.specs(cfg):
            specs.append(d if isinstance(d, ServiceSpec) else ServiceSpec(**d))
    return specs


def all_specs(cfg: Config) -> list[ServiceSpec]:
    return builtin_specs(cfg) + extra_specs(cfg)


# --- process bookkeeping ------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """Kernel start time of a process (field 22 of /proc/PID/stat): identifies it beyond its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_file(cfg: Config, name: str) -> Path:
    return cfg.state_dir / "pids" / f"{name}.pid"


def running_pid(cfg: Config, name: str) -> int | None:
    """The PID recorded for ``name`` if that very process is still alive."""
    path = _pid_file(cfg, name)
    try:
        pid_s, start = path.read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    if _start_time(pid) != start:
        return None  # gone, or the PID was recycled by another process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return None if state == "Z" else pid


def healthy(spec: ServiceSpec) -> bool:
    try:
        if spec.health_url:
            if not httpx.get(spec.health_url, timeout=5).is_success:
                return False
        if spec.health_check:
            return bool(spec.health_check())
        return True
    except httpx.HTTPError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    if mode is not None:
        tmp.chmod(mode)
    tmp.replace(path)


def launch(cfg: Config, spec: ServiceSpec) -> subprocess.Popen | None:
    """Start ``spec`` in its own process group unless it already runs (then None)."""
    pid = running_pid(cfg, spec.name)
    if pid is not None:
        print(f"{spec.name}: already running (pid {pid})")
        return None
    log_path = cfg.state_dir / "logs" / f"{spec.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **QUIET_ENV, **spec.env}
    env = {k: v for k, v in env.items() if v != ""}  # "" means: unset for this service
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(spec.cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            spec.cmd,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: down kills the whole tree
        )
    _write_atomic(_pid_file(cfg, spec.name), f"{proc.pid} {_start_time(proc.pid)}\n")
    return proc


def wait_healthy(cfg: Config, spec: ServiceSpec, proc: subprocess.Popen, t0: float) -> float:
    """Poll until ``spec`` is healthy; on exit or timeout stop it and fail with its log tail."""
    log_path = cfg.state_dir / "logs" / f"{spec.name}.log"
    while True:
        if proc.poll() is not None:
            _pid_file(cfg, spec.name).unlink(missing_ok=True)
            raise SystemExit(
                f"{spec.name}: exited with code {proc.returncode} while starting; last log lines ({log_path}):\n{_tail(log_path)}"
            )
        if healthy(spec):
            elapsed = time.monotonic() - t0
            print(
                f"{spec.name}: healthy after {elapsed:.1f}s (pid {proc.pid}){'  ' + spec.url if spec.url else ''}",
                flush=True,
            )
            return elapsed
        if time.monotonic() - t0 > spec.startup_timeout:
            stop_pid(proc.pid)
            _pid_file(cfg, spec.name).unlink(missing_ok=True)
            raise SystemExit(
                f"{spec.name}: not healthy after {spec.startup_timeout:.0f}s; stopped it. Last log lines ({log_path}):\n{_tail(log_path)}"
            )
        time.sleep(0.5)


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group of ``pid`` (it leads its own session), then SIGKILL after ``timeout``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        # reap if it is our child (it is not after a separate `make up`, then init reaps it)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def write_client_files(cfg: Config, specs: list[ServiceSpec]) -> None:
    info = {
        "state_dir": str(cfg.state_dir),
        "prefect_api_url": cfg.prefect_api_url,
        "prefect_ui_url": f"http://127.0.0.1:{cfg.prefect_port}",
        "mlflow_tracking_uri": cfg.mlflow_url,
        "services": {s.name: s.url for s in specs if s.url},
    }
    _write_atomic(cfg.state_dir / "services.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    # 0600: with S3 it carries credentials
    env_sh = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(cfg.client_env().items()))
    _write_atomic(cfg.state_dir / "env.sh", env_sh, mode=0o600)


def remove_client_files(cfg: Config) -> None:
    (cfg.state_dir / "services.json").unlink(missing_ok=True)


# --- commands -----------------------------------------------------------------------------------


def up(cfg: Config, only: list[str] | None = None) -> dict[str, float]:
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    if "://" not in cfg.mlflow_artifacts_destination:
        Path(cfg.mlflow_artifacts_destination).mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    specs = [s for s in all_specs(cfg) if not only or s.name in only]
    # clients (the serve process) need the URLs as soon as the servers are up
    write_client_files(cfg, specs)
    t0 = time.monotonic()
    times: dict[str, float] = {}
    for group in sorted({s.group for s in specs}):
        members = [s for s in specs if s.group == group]
        tg = time.monotonic()
        procs = {s.name: launch(cfg, s) for s in members}  # a group starts concurrently
        for s in members:
            proc = procs[s.name]
            times[s.name] = 0.0 if proc is None else wait_healthy(cfg, s, proc, tg)
    print(f"all services up in {time.monotonic() - t0:.1f}s")
    print(f"  Prefect UI: http://127.0.0.1:{cfg.prefect_port}   MLflow UI: {cfg.mlflow_url}")
    print(f"  state: {cfg.state_dir}   clients: source {cfg.state_dir / 'env.sh'}")
    return times


def down(cfg: Config) -> None:
    # reverse order: the serve process pauses its deployments through the Prefect API on SIGTERM
    for spec in reversed(all_specs(cfg)):
        pid = running_pid(cfg, spec.name)
        if pid is None:
            _pid_file(cfg, spec.name).unlink(missing_ok=True)
            continue
        stop_pid(pid)
        _pid_file(cfg, spec.name).unlink(missing_ok=True)
        print(f"{spec.name}: stopped (pid {pid})")
    remove_client_files(cfg)


def status(cfg: Config) -> int:
    bad = 0
    for spec in all_specs(cfg):
        pid = running_pid(cfg, spec.name)
        if pid is None:
            state, bad = "stopped", bad + 1
        else:
            ok = healthy(spec)
            state = f"running (pid {pid}) {'healthy' if ok else 'UNHEALTHY'}"
            bad += not ok
        print(f"{spec.name:10s} {state}{'  ' + spec.url if spec.url else ''}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--only", nargs="*", help="start only these services (names)")
    args = parser.parse_args(argv)
    cfg = load_config()
    if args.command == "up":
        up(cfg, args.only)
        return 0
    if args.command == "down":
        down(cfg)
        return 0
    return status(cfg)


if __name__ == "__main__":
    sys.exit(main())

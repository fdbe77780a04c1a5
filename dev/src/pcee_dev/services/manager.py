"""Start, stop, restart and inspect pcee's local services: ``make up`` / ``make down`` / ``make status``
and ``scripts/services.py {up,down,status,stop,restart}``.

Services (all on 127.0.0.1, all state under ``$PCEE_STATE_DIR``, default ``.pcee/``):

- ``prefect``: a real ``prefect server start`` (port ``PCEE_PREFECT_PORT``, default 4200);
- ``mlflow``: a real ``mlflow server`` (port ``PCEE_MLFLOW_PORT``, default 5000) with a sqlite
  backend in the state dir (``PCEE_MLFLOW_BACKEND_URI`` for any SQLAlchemy URL, e.g. Postgres)
  and proxied artifacts in the state dir (``PCEE_MLFLOW_ARTIFACTS_DESTINATION``, e.g. ``s3://...``);
- ``serve``: one process serving the Prefect deployments (``flows/serve.py``);
- what the hooks add (:mod:`pcee_dev.services.hooks`): PostgreSQL, the S3 server, the Dask cluster,
  and serving (the HTTP replicas, the load balancer in front of them, the fleet's coordinator).

Every service runs under supervisord (:mod:`pcee_dev.services.supervisor`): in its own process group,
logging to ``<state>/logs/<name>.log``, restarted when it dies (logged to ``<state>/logs/restarts.log``,
counted by ``status``). ``up`` starts the services group by group, each group once the one before is
healthy; it is idempotent (a running service is left alone). ``stop NAME`` / ``restart NAME`` act
on one service (a restart waits until it is healthy again). ``down`` stops everything supervisord
runs for this state directory, whatever the environment says now, then supervisord itself.

``up`` also writes ``<state>/services.json`` (URLs) and ``<state>/env.sh`` (:func:`client_env_file`):
``source`` it and a new shell reaches the same services and stores. Nothing is written outside the
state directory (no ``prefect.toml`` in the checkout: Prefect reads that file from every process's
working directory, so one appearing and vanishing under a running test suite raced with its clients).

Only the standard library, httpx and supervisor's client are imported here, so this starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pcee_dev.mlflow_server import mlflow_server_cmd
from pcee_dev.proc import tail
from pcee_dev.services.supervisor import Program, Supervisor

REPO = Path(__file__).resolve().parents[4]  # dev/src/pcee_dev/services -> the repository
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
    restart: bool = True  # supervisord restarts it when it exits (False: a one-shot)
    stop_timeout: float = 20.0  # SIGTERM to its group, SIGKILL after this long


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
    # what clients need beyond the service URLs (engines, S3 endpoint and credentials, the Dask scheduler)
    client_extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def client_env(self) -> dict[str, str]:
        """What a client (a flow, the serve process, a test, a new shell) needs to reach the services."""
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


# the settings a client must see as make up saw them: the engines chosen and where they are
ENGINE_VARS = (
    "PCEE_SCALE_OUT",
    "PCEE_DB",
    "PCEE_POSTGRES_URL",
    "PCEE_POSTGRES_PORT",
    "PCEE_TRAFFIC_URL",
    "PCEE_ARTIFACTS",
    "PCEE_S3_ENDPOINT_URL",
    "PCEE_S3_PORT",
    "PCEE_S3_BUCKET",
    "PCEE_DVC_REMOTE_URL",
    "PCEE_SERVE_PORT",
    "PCEE_SERVE_REPLICAS",
    "PCEE_SERVE_STATS_PORT",
    "PCEE_MODEL_NAME",
)


def _engine_env(s) -> dict[str, str]:
    """The engine settings in force, spelled out (so ``env.sh`` gives a new shell the same URLs)."""
    values = {
        "PCEE_PREFECT_PORT": str(s.prefect_port),
        "PCEE_MLFLOW_PORT": str(s.mlflow_port),
        "PCEE_DB": s.db,
        "PCEE_ARTIFACTS": s.artifacts,
        "PCEE_POSTGRES_PORT": str(s.postgres_port),
        "PCEE_S3_PORT": str(s.s3_port),
        "PCEE_S3_BUCKET": s.s3_bucket,
        "PCEE_SERVE_PORT": str(s.serve_port),
        "PCEE_SERVE_REPLICAS": str(s.serve_replicas),
        "PCEE_SERVE_STATS_PORT": str(s.stats_port()),
        "PCEE_TASK_RUNNER": s.task_runner,
    }
    if s.scale_out:
        values["PCEE_SCALE_OUT"] = "1"
    for var in ENGINE_VARS:  # what the caller set explicitly travels as it is
        if os.environ.get(var):
            values[var] = os.environ[var]
    return values


def load_config() -> Config:
    """The services' configuration from the environment (:mod:`pcee.settings`); a bad value stops ``make up``."""
    from pcee.settings import Settings, SettingsError

    try:
        s = Settings()
    except SettingsError as err:
        raise SystemExit(str(err)) from None
    backend = s.mlflow_backend_uri
    if backend is None and s.db == "postgres":
        from pcee_dev import postgres

        if not s.postgres_url:
            postgres.local_server(s).password  # noqa: B018 - generated once, before anything reads it
        backend = postgres.mlflow_backend_uri(s)  # the pcee_mlflow database (password from the state dir)
    artifacts = s.mlflow_artifacts_destination
    mlflow_env: dict[str, str] = {}
    client_extra_env: dict[str, str] = _engine_env(s)
    if s.artifacts == "s3":
        from pcee_dev import s3

        if s3.is_local(s):
            s3.ensure_local_credentials(s.state_dir)  # generated once, before anything reads them
        artifacts = artifacts or s3.artifacts_destination(s)  # s3://<bucket>/mlflow
        s3_env = s3.client_env(s)  # endpoint and credentials
        mlflow_env.update(s3_env)  # the server proxies artifacts
        client_extra_env.update(s3_env)  # DVC's S3 remote in the flows
    if s.serve_token is None:  # the HTTP service and its clients share a token generated once (0600, state dir)
        from pcee.serving.auth import ensure_token_file

        client_extra_env["PCEE_SERVE_TOKEN"] = ensure_token_file(s.state_dir)
    if s.task_runner == "dask" and not s.dask_address:
        from pcee.stack import dask

        client_extra_env.update(dask.client_env(s))  # the scheduler the dask hook starts
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
            cmd=mlflow_server_cmd(cfg.mlflow_port, cfg.mlflow_artifacts_destination, workers=cfg.mlflow_workers),
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
    """The engines' and serving's services (:mod:`pcee_dev.services.hooks`), in hook order."""
    from pcee_dev.services import hooks

    return [d if isinstance(d, ServiceSpec) else ServiceSpec(**d) for d in hooks.specs(cfg)]


def all_specs(cfg: Config) -> list[ServiceSpec]:
    return builtin_specs(cfg) + extra_specs(cfg)


# --- health ---------------------------------------------------------------------------------------


def healthy(spec: ServiceSpec) -> bool:
    try:
        if spec.health_url and not httpx.get(spec.health_url, timeout=5).is_success:
            return False
        if spec.health_check:
            return bool(spec.health_check())
        return True
    except httpx.HTTPError:
        return False


def _log(cfg: Config, name: str) -> Path:
    return cfg.state_dir / "logs" / f"{name}.log"


def running_pid(cfg: Config, name: str) -> int | None:
    """The PID of service ``name`` while supervisord runs it (starting or running), else None."""
    info = Supervisor(cfg.state_dir).info(name)
    if info is None or info["statename"] not in ("STARTING", "RUNNING"):
        return None
    return int(info["pid"]) or None


def _exit_reason(cfg: Config, name: str) -> str:
    """How ``name`` last ended, from supervisord's log ("exited with code 3", "killed by SIGKILL")."""
    found = "exited"
    pattern = re.compile(rf"exited: {re.escape(name)} \((?:exit status (\d+)|terminated by (\w+))")
    for line in tail(cfg.state_dir / "logs" / "supervisord.log", 200).splitlines():
        m = pattern.search(line)
        if m:
            found = f"exited with code {m.group(1)}" if m.group(1) else f"killed by {m.group(2)}"
    return found


def wait_healthy(cfg: Config, spec: ServiceSpec, t0: float) -> float:
    """Poll until ``spec`` is healthy; when it exits (a failed start) or times out, stop it and fail
    with its log tail. Returns the seconds since ``t0``."""
    sup = Supervisor(cfg.state_dir)
    while True:
        info = sup.info(spec.name) or {}
        state = info.get("statename")
        if state in ("EXITED", "BACKOFF", "FATAL", "STOPPED"):
            sup.stop(spec.name)  # no retries of a start that failed under make up's eyes
            raise SystemExit(
                f"{spec.name}: {_exit_reason(cfg, spec.name)} while starting ({info.get('spawnerr') or state}); "
                f"last log lines ({_log(cfg, spec.name)}):\n{tail(_log(cfg, spec.name))}"
            )
        if state == "RUNNING" or state == "STARTING":
            if healthy(spec):
                elapsed = time.monotonic() - t0
                where = f"  {spec.url}" if spec.url else ""
                print(f"{spec.name}: healthy after {elapsed:.1f}s (pid {info.get('pid')}){where}", flush=True)
                return elapsed
        if time.monotonic() - t0 > spec.startup_timeout:
            sup.stop(spec.name)
            raise SystemExit(
                f"{spec.name}: not healthy after {spec.startup_timeout:.0f}s; stopped it. "
                f"Last log lines ({_log(cfg, spec.name)}):\n{tail(_log(cfg, spec.name))}"
            )
        time.sleep(0.1)


# --- the client files -------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if mode is None else mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    if mode is None:
        tmp.chmod(0o644)
    tmp.replace(path)


def client_env_file(cfg: Config) -> str:
    """``env.sh``: every variable a client needs, so that ``source <state>/env.sh`` in a new shell gets
    the URLs, stores and credentials ``make up`` used. One place: add a client variable here."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(cfg.client_env().items()))


def recorded_env() -> dict[str, str]:
    """The variables of ``<state>/env.sh`` written by the last ``make up`` ({} when there is none)."""
    from pcee.settings import Settings

    try:
        text = (Settings().state_dir / "env.sh").read_text()
    except OSError:
        return {}
    pairs = (shlex.split(line[len("export ") :])[0] for line in text.splitlines() if line.startswith("export "))
    return dict(pair.split("=", 1) for pair in pairs)


def write_client_files(cfg: Config, specs: list[ServiceSpec]) -> None:
    info = {
        "state_dir": str(cfg.state_dir),
        "prefect_api_url": cfg.prefect_api_url,
        "prefect_ui_url": f"http://127.0.0.1:{cfg.prefect_port}",
        "mlflow_tracking_uri": cfg.mlflow_url,
        "services": {s.name: s.url for s in specs if s.url},
    }
    _write_atomic(cfg.state_dir / "services.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    _write_atomic(cfg.state_dir / "env.sh", client_env_file(cfg), mode=0o600)  # it carries credentials


# --- commands -----------------------------------------------------------------------------------


def _program(spec: ServiceSpec) -> Program:
    env = {**os.environ, **QUIET_ENV, **spec.env}
    env = {k: v for k, v in env.items() if v != ""}  # "" means: unset for this service
    return Program(
        name=spec.name,
        cmd=list(spec.cmd),
        env=env,
        cwd=str(REPO),
        group=spec.group,
        autorestart=spec.restart,
        stop_timeout_s=spec.stop_timeout,
    )


def up(cfg: Config, only: list[str] | None = None, specs: list[ServiceSpec] | None = None) -> dict[str, float]:
    """Start the services (``only`` these names; ``specs`` instead of :func:`all_specs`) group by
    group; returns the seconds each took to be healthy (0.0: it was running already)."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    if "://" not in cfg.mlflow_artifacts_destination:
        Path(cfg.mlflow_artifacts_destination).mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    specs = [s for s in (all_specs(cfg) if specs is None else specs) if not only or s.name in only]
    write_client_files(cfg, specs)  # clients (the serve process) need the URLs as soon as the servers are up
    sup = Supervisor(cfg.state_dir)
    fresh = [s for s in specs if running_pid(cfg, s.name) is None]
    for s in fresh:
        sup.write_program(_program(s))
    sup.ensure_running()
    t0 = time.monotonic()
    times: dict[str, float] = {}
    for group in sorted({s.group for s in specs}):
        members = [s for s in specs if s.group == group]
        tg = time.monotonic()
        for s in members:  # a group starts concurrently
            if s in fresh:
                sup.start(s.name)
            else:
                print(f"{s.name}: already running (pid {running_pid(cfg, s.name)})")
        for s in members:
            times[s.name] = wait_healthy(cfg, s, tg) if s in fresh else 0.0
    print(f"all services up in {time.monotonic() - t0:.1f}s")
    print(f"  Prefect UI: http://127.0.0.1:{cfg.prefect_port}   MLflow UI: {cfg.mlflow_url}")
    print(f"  state: {cfg.state_dir}   clients: source {cfg.state_dir / 'env.sh'}")
    return times


def stop(cfg: Config, names: list[str]) -> None:
    """Stop these services (supervisord will not restart them); the others run on."""
    sup = Supervisor(cfg.state_dir)
    known = {i["name"] for i in sup.all_info()}
    for name in names:
        if name not in known:
            raise SystemExit(f"{name}: no such service under {cfg.state_dir} (running: {', '.join(sorted(known))})")
        pid = running_pid(cfg, name)
        sup.stop(name)
        print(f"{name}: stopped" + (f" (pid {pid})" if pid else " (was not running)"), flush=True)


def restart(cfg: Config, names: list[str], specs: list[ServiceSpec] | None = None) -> dict[str, float]:
    """Stop these services, start them again, wait until each is healthy; the seconds each took."""
    by_name = {s.name: s for s in (all_specs(cfg) if specs is None else specs)}
    stop(cfg, names)
    sup, times = Supervisor(cfg.state_dir), {}
    for name in names:
        t0 = time.monotonic()
        sup.start(name)
        spec = by_name.get(name) or ServiceSpec(name=name, cmd=[])
        times[name] = wait_healthy(cfg, spec, t0)
    return times


def down(cfg: Config) -> None:
    """Stop everything supervisord runs for this state directory (higher groups first: the serve
    process pauses its deployments through the Prefect API on SIGTERM), then supervisord."""
    sup = Supervisor(cfg.state_dir)
    if not sup.alive():
        print("nothing running")
        return
    programs = sup.programs()
    infos = sorted(sup.all_info(), key=lambda i: -(programs[i["name"]].group if i["name"] in programs else 0))
    for info in infos:
        if info["statename"] in ("RUNNING", "STARTING", "BACKOFF"):
            sup.stop(info["name"])
            print(f"{info['name']}: stopped (pid {info['pid']})", flush=True)
    sup.shutdown()
    (cfg.state_dir / "services.json").unlink(missing_ok=True)


def status(cfg: Config) -> int:
    """One line per service: state, health, restarts; 1 when any is not running and healthy."""
    sup = Supervisor(cfg.state_dir)
    if not sup.alive():
        print(f"nothing running under {cfg.state_dir} (make up starts the services)")
        return 1
    specs = {s.name: s for s in all_specs(cfg)}
    restarts = sup.restarts()
    bad = 0
    for info in sup.all_info():
        name, state = info["name"], info["statename"]
        spec = specs.get(name)
        if state in ("RUNNING", "STARTING"):  # STARTING: for its first START_SECS
            ok = healthy(spec) if spec else True
            state = f"running (pid {info['pid']}, up {_uptime(info)}) {'healthy' if ok else 'UNHEALTHY'}"
            bad += not ok
        else:
            bad += 1
        r = restarts.get(name)
        if r and r["restarts"]:
            state += f"; restarted {r['restarts']}x, last {r['last']['time']} ({r['last']['event']})"
        url = f"  {spec.url}" if spec and spec.url else ""
        print(f"{name:16s} {state}{url}")
    print(f"restart log: {sup.restarts_log}")
    return 1 if bad else 0


def _uptime(info: dict) -> str:
    s = max(0, int(info["now"]) - int(info["start"]))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="start, stop, restart and inspect pcee's local services")
    parser.add_argument("command", choices=["up", "down", "status", "stop", "restart"])
    parser.add_argument("names", nargs="*", help="stop / restart: the services (names as `status` shows them)")
    parser.add_argument("--only", nargs="*", help="up: start only these services (names)")
    args = parser.parse_args(argv)
    if args.command != "up":  # look at what make up started, whatever this shell has not set
        for key, value in recorded_env().items():
            os.environ.setdefault(key, value)
    cfg = load_config()
    if args.command in ("stop", "restart") and not args.names:
        parser.error(f"{args.command} needs the names of the services")
    if args.command == "up":
        up(cfg, args.only)
    elif args.command == "down":
        down(cfg)
    elif args.command == "stop":
        stop(cfg, args.names)
    elif args.command == "restart":
        restart(cfg, args.names)
    else:
        return status(cfg)
    return 0

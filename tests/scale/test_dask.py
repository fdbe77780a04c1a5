"""Prefect on a Dask cluster (README "Scale-out"): ``make up`` with ``PCEE_TASK_RUNNER=dask`` starts a
real ``dask scheduler`` and two ``dask worker`` processes (:mod:`pcee_dev.services.hooks.dask`, run by
the service manager's own up/down under supervisord, beside a real Prefect server); the pipeline's fan-out task runs
on those worker processes and reports to the Prefect API from there; a scheduler that is gone fails
the flow run (Failed, not left Running) naming its address, within seconds, with no task run created;
one that dies during the fan-out fails it at once, naming it too.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pcee.params import OperatingPointParams
from pcee_dev.proc import free_port, listening_sockets
from pcee_dev.services import manager as services
from pcee_dev.services.hooks import dask as dask_hook
from tests.pipeline.test_task_runner import outputs  # the same synthetic exit outputs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


def _config(state: Path, **ports: int):
    return services.Config(
        state_dir=state,
        prefect_port=ports.get("prefect_port", 4200),
        mlflow_port=ports.get("mlflow_port", 5000),
        mlflow_backend_uri=f"sqlite:///{state / 'mlflow.db'}",
        mlflow_artifacts_destination=str(state / "artifacts"),
        mlflow_workers=1,
    )


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """``make up`` with PCEE_TASK_RUNNER=dask, limited to Prefect and this hook's services (the
    other hooks belong to other engines): services.py's real up/down, groups, PID files, health checks."""
    root = tmp_path_factory.mktemp("dask-up")
    env = {
        "PCEE_STATE_DIR": str(root / "state"),
        "PREFECT_HOME": str(root / "state" / "prefect"),
        "PCEE_PREFECT_PORT": str(free_port()),
        "PCEE_MLFLOW_PORT": str(free_port()),
        "PCEE_TASK_RUNNER": "dask",
        "PCEE_DASK_WORKERS": "2",
        "PCEE_DASK_SCHEDULER_PORT": str(free_port()),
        "PCEE_DASK_DASHBOARD_PORT": str(free_port()),
        # less for the Prefect server to start on 2 shared cores; none of it is used here
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
        "OMP_NUM_THREADS": "1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("PCEE_DASK_ADDRESS", raising=False)
        mp.delenv("PCEE_SCALE_OUT", raising=False)
        cfg = services.load_config()
        prefect = next(s for s in services.builtin_specs(cfg) if s.name == "prefect")
        specs = [prefect, *(services.ServiceSpec(**d) for d in dask_hook.specs(cfg))]
        try:
            t0 = time.monotonic()
            times = services.up(cfg, specs=specs)
            print(f"up in {time.monotonic() - t0:.1f}s: {times}")
            pids = {s.name: services.running_pid(cfg, s.name) for s in specs}
            address = f"tcp://127.0.0.1:{env['PCEE_DASK_SCHEDULER_PORT']}"
            yield SimpleNamespace(cfg=cfg, specs=specs, pids=pids, address=address, api=cfg.prefect_api_url)
        finally:
            _drain_prefect_events()
            services.down(cfg)


def _drain_prefect_events() -> None:
    """Prefect's events worker is one per process and keeps the API URL it started with: drain it while
    this module's server still runs, so that a later test in this process (another Prefect server, e.g.
    the drift automation's) gets a new one instead of sending its events to a server that is gone."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=10)


OP_SETTINGS = OperatingPointParams(target_accuracy=0.5, risk=0.1, bound="clopper-pearson", mode="certified")


def _where_task():
    """A task reporting the process it ran in. Built in a function: cloudpickle then ships it by
    value, so the workers need not import this test module."""
    from prefect import task

    @task(name="where")
    def where(i: int, rendezvous: str, n: int) -> dict:
        import os
        import time
        from pathlib import Path

        from distributed import get_worker

        # a file barrier (the workers share this machine): each of the n tasks holds its worker's only
        # thread until all n have started, so n tasks at once can only be on n distinct workers
        (Path(rendezvous) / f"{i}-{os.getpid()}").touch()
        deadline = time.monotonic() + 30
        while len(list(Path(rendezvous).iterdir())) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"i": i, "pid": os.getpid(), "worker": get_worker().name}

    return where


def _task_runs(api: str, flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _flow_run(api: str, flow_run_id):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def test_make_up_starts_scheduler_and_workers_on_loopback(up):
    from pcee_dev.dask import check_scheduler

    workers = {n: p for n, p in up.pids.items() if n.startswith("dask-worker-")}
    assert sorted(workers) == ["dask-worker-0", "dask-worker-1"] and all(workers.values())
    assert up.pids["dask-scheduler"] and up.pids["prefect"]
    info = check_scheduler(up.address)
    assert sorted(w["name"] for w in info["workers"].values()) == ["dask-worker-0", "dask-worker-1"]
    assert all(a.startswith("tcp://127.0.0.1:") for a in info["workers"]), info["workers"].keys()
    assert info["address"] == up.address
    # every socket of the scheduler, the workers and Prefect listens on loopback (Dask's HTTP servers too)
    found = listening_sockets([p for p in up.pids.values() if p])
    assert {ip for _, ip, _ in found} == {"127.0.0.1"}, found
    assert int(up.address.rsplit(":", 1)[1]) in {port for *_, port in found}
    # the workers got the clients' environment (they run Prefect tasks that report to the API)
    env = dict(
        line.split("=", 1)
        for line in Path(f"/proc/{workers['dask-worker-0']}/environ").read_bytes().decode().split("\0")
        if "=" in line
    )
    assert env["PREFECT_API_URL"] == up.api and env["PCEE_DASK_ADDRESS"] == up.address
    with pytest.MonkeyPatch.context() as mp:  # make status: every service running and healthy
        mp.setattr(services, "all_specs", lambda c: up.specs)
        assert services.status(up.cfg) == 0


def test_fan_out_runs_on_the_worker_processes(up, tmp_path):
    from prefect import flow
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pcee.operating_point import choose_operating_point, split_fit_calibrate
    from pcee.settings import Settings
    from pcee.sweep import sweep_policy
    from tasks import calibrate as C
    from tasks.runner import connect_task_runner, make_task_runner

    where = _where_task()
    val, test = outputs(0), outputs(1)
    runner = make_task_runner(Settings(task_runner="dask", dask_address=up.address))

    @flow(name="dask-fanout", task_runner=runner)
    def fanout() -> tuple[list[dict], list[dict]]:
        connect_task_runner()
        places = [where.submit(i, str(tmp_path), 2) for i in range(2)]
        ops = [C.operating_point.submit(p, val, test, OP_SETTINGS) for p in ("pcee", "threshold")]
        return [f.result() for f in ops], [f.result() for f in places]

    t0 = time.monotonic()
    with temporary_settings({PREFECT_API_URL: up.api}):
        state = fanout(return_state=True)
    print(f"flow on the cluster: {time.monotonic() - t0:.1f}s")
    assert state.is_completed(), state
    ops, places = state.result()

    # the tasks ran in the two worker processes make up started, not in this one
    worker_pids = {up.pids["dask-worker-0"], up.pids["dask-worker-1"]}
    assert {p["pid"] for p in places} == worker_pids and os.getpid() not in worker_pids
    assert {p["worker"] for p in places} == {"dask-worker-0", "dask-worker-1"}
    # the real fan-out's answers are the library's
    for res in ops:
        fit_idx, _ = split_fit_calibrate(val.labels, 0.5, 0)
        assert res["rows"] == sweep_policy(res["policy"], val.subset(fit_idx), test).to_rows()
        want = choose_operating_point(res["policy"], val, target_accuracy=0.5, test=test)
        assert res["op"].to_dict() == want.to_dict() and res["op"].certified
    # ... and the workers reported each task run to the Prefect API
    runs = _task_runs(up.api, state.state_details.flow_run_id)
    assert sorted(r.name.rsplit("-", 1)[0] for r in runs) == ["operating-point"] * 2 + ["where"] * 2
    assert all(r.state_type == StateType.COMPLETED for r in runs), [(r.name, r.state_type) for r in runs]


def _blocking_task():
    """A task that says it started (a file), then holds its worker while the test kills the scheduler."""
    from prefect import task

    @task(name="block")
    def block(started: str) -> int:
        import os
        import time
        from pathlib import Path

        Path(started).touch()
        deadline = time.monotonic() + 30
        while not Path(started + ".release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # released once the flow has failed: the worker then stops at once
        return os.getpid()

    return block


def test_scheduler_gone_fails_the_flow_naming_its_address(up, tmp_path):
    from prefect import flow, task
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pcee.settings import Settings
    from pcee_dev.dask import DaskSchedulerLost, DaskUnreachable, LocalDaskCluster
    from tasks.runner import connect_task_runner, make_task_runner

    # 1. the scheduler dies while a task runs on it: the flow fails at once, naming it
    block = _blocking_task()
    started = tmp_path / "started"
    killed_at: list[float] = []
    with LocalDaskCluster(tmp_path / "logs", n_workers=1, env={"PREFECT_API_URL": up.api}) as cluster:
        address = cluster.address
        scheduler = cluster.scheduler
        assert scheduler is not None
        scheduler_pid = scheduler.pid  # the flow ships with its tasks' context: a plain int, not the Popen

        @flow(name="dask-lost", task_runner=make_task_runner(Settings(task_runner="dask", dask_address=address)))
        def lost_flow() -> int:
            future = block.submit(str(started))
            deadline = time.monotonic() + 60
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.killpg(scheduler_pid, signal.SIGKILL)  # the scheduler dies, no goodbye
            killed_at.append(time.monotonic())
            return future.result()

        with temporary_settings({PREFECT_API_URL: up.api}):
            state = lost_flow(return_state=True)
        ended = time.monotonic()
        (tmp_path / "started.release").touch()
        scheduler.wait(timeout=10)
    assert killed_at and state.is_failed(), state
    lost_s = ended - killed_at[0]
    assert address in (state.message or "") and "lost" in (state.message or ""), state.message
    with pytest.raises(DaskSchedulerLost, match=address):
        state.result()
    print(f"failed {lost_s:.1f}s after the scheduler was killed")  # reported: no timing assertion in a test

    # 2. a flow started with the scheduler gone fails at its start, naming it; building the runner
    # needs no cluster (the flows build theirs on import)
    runner = make_task_runner(Settings(task_runner="dask", dask_address=address))
    ran = []

    @task
    def never(i: int) -> int:
        ran.append(i)
        return i

    @flow(name="dask-gone", task_runner=runner)
    def gone_flow() -> list[int]:
        connect_task_runner()
        ran.append("after connect")
        return [f.result() for f in [never.submit(i) for i in range(2)]]

    t0 = time.monotonic()
    with temporary_settings({PREFECT_API_URL: up.api}):
        state = gone_flow(return_state=True)
    elapsed = time.monotonic() - t0
    assert state.is_failed(), state
    message = state.message or ""
    assert address in message and "not reachable" in message, message
    with pytest.raises(DaskUnreachable, match=address):
        state.result()
    print(f"failed in {elapsed:.1f}s")  # reported: no timing assertion in a test
    assert ran == []  # failed at the flow's start, before its first step
    # nothing half-registered: the run is Failed in the API (not left Running) and has no task run
    assert _flow_run(up.api, state.state_details.flow_run_id).state_type == StateType.FAILED
    assert _task_runs(up.api, state.state_details.flow_run_id) == []


def test_hook_specs_follow_the_settings(tmp_path, monkeypatch):
    """Unit level: what the hook asks make up to start, for each setting."""
    hook = dask_hook
    cfg = _config(tmp_path / "state", prefect_port=14200)
    port = 18786
    for k in (
        "PCEE_DASK_ADDRESS",
        "PCEE_SCALE_OUT",
        "PCEE_TASK_RUNNER",
        "PCEE_DASK_WORKERS",
        "PCEE_DASK_DASHBOARD_PORT",
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PCEE_DASK_SCHEDULER_PORT", str(port))
    assert hook.specs(cfg) == []  # thread runner: nothing to start

    monkeypatch.setenv("PCEE_TASK_RUNNER", "dask")
    monkeypatch.setenv("PCEE_DASK_WORKERS", "3")
    specs = hook.specs(cfg)
    assert [s["name"] for s in specs] == ["dask-scheduler", "dask-worker-0", "dask-worker-1", "dask-worker-2"]
    sched, *workers = specs
    assert sched["group"] == -1 and all(w["group"] == 0 for w in workers)  # scheduler first
    assert sched["cmd"][1:] == [
        "-m",
        "distributed.cli.dask_scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-dashboard",
        "--dashboard-address",
        f"127.0.0.1:{port + 1}",  # its HTTP server on loopback, on the port after the scheduler's by default
    ]
    address = f"tcp://127.0.0.1:{port}"
    assert sched["url"] == address
    for i, w in enumerate(workers):
        cmd = w["cmd"]
        assert cmd[3] == address and cmd[cmd.index("--host") + 1] == "127.0.0.1"
        assert cmd[cmd.index("--name") + 1] == f"dask-worker-{i}" and cmd[cmd.index("--nthreads") + 1] == "1"
        assert "--no-dashboard" in cmd and cmd[cmd.index("--dashboard-address") + 1] == "127.0.0.1:0"
        assert w["env"]["PREFECT_API_URL"] == "http://127.0.0.1:14200/api"
        assert w["env"]["PCEE_STATE_DIR"] == str(cfg.state_dir) and w["env"]["PCEE_DASK_ADDRESS"] == address
    assert sched["health_check"]() is False  # nothing listens yet (a Dask connect retries: ~2 s)
    services.ServiceSpec(**sched)  # make up accepts them

    monkeypatch.setenv("PCEE_SCALE_OUT", "1")  # the one switch implies the Dask runner
    monkeypatch.delenv("PCEE_TASK_RUNNER")
    assert [s["name"] for s in hook.specs(cfg)][0] == "dask-scheduler"

    monkeypatch.setenv("PCEE_DASK_ADDRESS", "tcp://10.0.0.5:8786")
    assert hook.specs(cfg) == []  # an existing scheduler: nothing to start

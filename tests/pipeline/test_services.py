"""The service manager (``scripts/services.py``, :mod:`pcee_dev.services.manager`) with the real
supervisord on a real (tiny) HTTP service: health-wait, idempotent up, a service killed with
``kill -9`` is restarted and the restart logged and shown by status, stop and restart of one
service, down stops whole process groups and supervisord, failures show the log tail."""

import os
import signal
import sys
import time

import pytest

from pcee_dev.proc import free_port, http_ok, listening_sockets
from pcee_dev.services import manager as services
from pcee_dev.services.supervisor import Supervisor


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("PCEE_STATE_DIR", str(tmp_path / "state"))
    config = services.load_config()
    yield config
    services.down(config)  # whatever a failing test left running


def http_spec(port: int, name="web") -> services.ServiceSpec:
    # the server forks a child so that stopping the group (not just the leader) is tested
    code = f"import subprocess,sys,http.server; subprocess.Popen([sys.executable,'-c','import time; time.sleep(600)']); http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')"
    return services.ServiceSpec(
        name=name,
        cmd=[sys.executable, "-c", code],
        health_url=f"http://127.0.0.1:{port}/",
        url=f"http://127.0.0.1:{port}",
        group=0,
        startup_timeout=30,
    )


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_up_restart_after_kill_stop_restart_down(cfg, monkeypatch, capsys):
    port = free_port()
    spec = http_spec(port)
    monkeypatch.setattr(services, "all_specs", lambda c: [spec])
    assert services.up(cfg)["web"] > 0
    pid = services.running_pid(cfg, "web")
    assert pid is not None and services.status(cfg) == 0
    assert (cfg.state_dir / "services.json").is_file() and (cfg.state_dir / "logs" / "web.log").is_file()
    assert services.up(cfg)["web"] == 0.0  # second up: already running, nothing started
    assert services.running_pid(cfg, "web") == pid and "already running" in capsys.readouterr().out

    os.kill(pid, signal.SIGKILL)  # dies: supervisord starts it again, and the restart is logged
    _wait(lambda: services.running_pid(cfg, "web") not in (None, pid) and http_ok(spec.health_url))
    assert Supervisor(cfg.state_dir).restarts()["web"]["restarts"] == 1
    assert services.status(cfg) == 0 and "restarted 1x" in capsys.readouterr().out

    services.stop(cfg, ["web"])  # stopped on purpose: not restarted, not counted
    assert services.running_pid(cfg, "web") is None and not http_ok(spec.health_url)
    assert services.status(cfg) == 1
    assert services.restart(cfg, ["web"])["web"] >= 0 and http_ok(spec.health_url)
    assert Supervisor(cfg.state_dir).restarts()["web"]["restarts"] == 1
    with pytest.raises(SystemExit, match="no such service"):
        services.stop(cfg, ["nope"])

    leader = services.running_pid(cfg, "web")
    services.down(cfg)
    with pytest.raises(ProcessLookupError):
        os.killpg(leader, 0)  # the whole group (server and its child) is gone
    assert not Supervisor(cfg.state_dir).alive() and services.status(cfg) == 1


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_failing_service_reports_log_tail(cfg, monkeypatch):
    bad = services.ServiceSpec(
        name="bad",
        cmd=[sys.executable, "-c", "print('boom: port taken'); raise SystemExit(3)"],
        health_url="http://127.0.0.1:9/",
        group=0,
    )
    monkeypatch.setattr(services, "all_specs", lambda c: [bad])
    with pytest.raises(SystemExit, match="(?s)exited with code 3.*boom: port taken"):
        services.up(cfg)
    assert services.running_pid(cfg, "bad") is None  # not left to supervisord's retries


def test_bad_port_is_refused(monkeypatch):
    monkeypatch.setenv("PCEE_PREFECT_PORT", "http")
    with pytest.raises(SystemExit, match="PCEE_PREFECT_PORT"):
        services.load_config()


@pytest.mark.integration
def test_stack_listens_on_loopback_only(stack):
    """Every socket the pipeline's stack (Prefect, MLflow, the serve process) listens on is on 127.0.0.1."""
    cfg = services.load_config()
    pids = [int(i["pid"]) for i in Supervisor(cfg.state_dir).all_info() if i["pid"]]
    found = listening_sockets(pids)
    assert len(found) >= 2 and {ip for _, ip, _ in found} == {"127.0.0.1"}, found

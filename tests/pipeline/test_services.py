"""scripts/services.py process management on a real (tiny) HTTP service: health-wait, PID files,
idempotent up, down stops the whole process group, failures show the log tail."""

import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("pcee_services", REPO / "scripts" / "services.py")
services = importlib.util.module_from_spec(spec)
sys.modules["pcee_services"] = services  # dataclasses look their module up
spec.loader.exec_module(services)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("PCEE_STATE_DIR", str(tmp_path / "state"))
    return services.load_config()


def http_spec(port: int, name="web") -> "services.ServiceSpec":
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


def test_up_idempotent_down(cfg, monkeypatch, capsys):
    port = free_port()
    monkeypatch.setattr(services, "all_specs", lambda c: [http_spec(port)])
    times = services.up(cfg)
    assert times["web"] > 0
    pid = services.running_pid(cfg, "web")
    assert pid is not None and services.status(cfg) == 0
    assert (cfg.state_dir / "services.json").is_file() and (cfg.state_dir / "logs" / "web.log").is_file()
    assert services.up(cfg)["web"] == 0.0  # second up: already running, nothing started
    assert services.running_pid(cfg, "web") == pid
    assert "already running" in capsys.readouterr().out
    services.down(cfg)
    assert services.running_pid(cfg, "web") is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole group (server and its child) is gone
    assert services.status(cfg) == 1


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
    assert services.running_pid(cfg, "bad") is None


def test_bad_port_is_refused(monkeypatch):
    monkeypatch.setenv("PCEE_PREFECT_PORT", "http")
    with pytest.raises(SystemExit, match="PCEE_PREFECT_PORT"):
        services.load_config()

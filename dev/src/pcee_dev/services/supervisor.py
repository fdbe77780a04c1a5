"""supervisord for ``make up``'s services: one per state directory, on a Unix socket (0700) in it.

Every service is a supervisord program that runs ``python -m pcee_dev.services.run FILE``: FILE
(``<state>/supervisor/programs/<name>.json``, mode 0600) holds its command and full environment, so
the configuration carries no secret and needs no escaping, and a restart runs exactly what ``make
up`` started. supervisord restarts a program that exits unexpectedly: at once when it had run
``START_SECS``, else after 1, 2, 3, ... s (its back-off), giving up (FATAL) after ``START_RETRIES``
failed starts. Each program leads its own process group, and a stop signals the whole group (SIGKILL
after its stop timeout). The event listener ``pcee_dev.services.events`` logs every unexpected exit
to ``<state>/logs/restarts.log``, which ``make status`` counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_SECS = 10  # a process that exits sooner failed to start: supervisord backs off before the next try
START_RETRIES = 20  # failed starts in a row before supervisord gives up (FATAL): 1 + 2 + ... + 20 s
LISTENER = "pcee-restarts"  # the event listener's name (never a service name)
MAX_SOCKET_PATH = 90  # a Unix socket's path must fit in sun_path (108 bytes); HAProxy takes at most 97


def socket_path(state_dir: Path, name: str) -> Path:
    """``<state>/supervisor/<name>``, or a short path under the temp dir when that is too long for a socket."""
    path = state_dir / "supervisor" / name
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"pcee-{digest}-{name}"


@dataclass(frozen=True)
class Program:
    """What supervisord runs for one service."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    cwd: str
    group: int = 1  # make down stops higher groups first
    autorestart: bool = True
    stop_timeout_s: float = 20.0


class Supervisor:
    """The supervisord of one state directory: its files, its process, its XML-RPC interface."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "supervisor"
        self.programs_dir = self.dir / "programs"
        self.conf = self.dir / "supervisord.conf"
        self.sock = socket_path(self.state_dir, "supervisor.sock")
        self.logs = self.state_dir / "logs"
        self.restarts_log = self.logs / "restarts.log"

    # -- programs
    def write_program(self, program: Program) -> None:
        self.programs_dir.mkdir(parents=True, exist_ok=True)
        path = self.programs_dir / f"{program.name}.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the environment may hold keys
        with os.fdopen(fd, "w") as fh:
            json.dump(program.__dict__, fh)
        tmp.replace(path)

    def programs(self) -> dict[str, Program]:
        out = {}
        for path in sorted(self.programs_dir.glob("*.json")):
            try:
                out[path.stem] = Program(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue
        return out

    def render(self) -> str:
        python = sys.executable
        lines = [
            "; written by pcee_dev.services (make up); regenerated on every up",
            "[unix_http_server]",
            f"file={self.sock}",
            "chmod=0700",
            "[supervisord]",
            f"logfile={self.logs / 'supervisord.log'}",
            f"pidfile={self.dir / 'supervisord.pid'}",
            f"childlogdir={self.logs}",
            "logfile_maxbytes=10MB",
            "identifier=pcee",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]",
            f"serverurl=unix://{self.sock}",
            f"[eventlistener:{LISTENER}]",
            f"command={python} -m pcee_dev.services.events {self.restarts_log}",
            "events=PROCESS_STATE_EXITED,PROCESS_STATE_BACKOFF,PROCESS_STATE_FATAL",
            f"stderr_logfile={self.logs / 'supervisor-events.log'}",
            "stdout_logfile=NONE",  # its stdout is supervisord's event protocol
            "autorestart=true",
        ]
        for p in self.programs().values():
            lines += [
                f"[program:{p.name}]",
                f"command={python} -m pcee_dev.services.run {self.programs_dir / (p.name + '.json')}",
                f"directory={p.cwd}",
                "autostart=false",
                f"autorestart={'true' if p.autorestart else 'false'}",
                f"startsecs={START_SECS if p.autorestart else 0}",
                f"startretries={START_RETRIES if p.autorestart else 0}",
                "stopsignal=TERM",
                f"stopwaitsecs={max(1, int(p.stop_timeout_s))}",
                "stopasgroup=true",
                "killasgroup=true",
                "redirect_stderr=true",
                f"stdout_logfile={self.logs / (p.name + '.log')}",
                "stdout_logfile_maxbytes=50MB",
                "stdout_logfile_backups=2",
            ]
        return "\n".join(lines) + "\n"

    # -- the daemon
    def rpc(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.sock}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def alive(self) -> bool:
        try:
            return self.rpc().getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def ensure_running(self, timeout_s: float = 30.0) -> None:
        """Write the configuration; start supervisord, or make the running one load the new programs."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.render())
        if self.alive():
            added, changed, removed = self.rpc().reloadConfig()[0]
            for name in removed + changed:
                if name in changed and self.state(name) in ("RUNNING", "STARTING", "BACKOFF"):
                    continue  # its options changed while it runs: the new ones apply after make down
                self.rpc().removeProcessGroup(name)
            for name in added + [c for c in changed if self.state(c) is None]:
                self.rpc().addProcessGroup(name)
            return
        self.sock.unlink(missing_ok=True)
        supervisord = Path(sys.executable).parent / "supervisord"
        proc = subprocess.run(
            [str(supervisord), "-c", str(self.conf)], capture_output=True, text=True, timeout=timeout_s
        )
        if proc.returncode != 0:
            raise RuntimeError(f"supervisord did not start (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
        deadline = time.monotonic() + timeout_s
        while not self.alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord not answering on {self.sock}; see {self.logs / 'supervisord.log'}")
            time.sleep(0.05)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        if not self.alive():
            return
        pid_file = self.dir / "supervisord.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        self.rpc().shutdown()
        deadline = time.monotonic() + timeout_s
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)

    # -- processes
    def info(self, name: str) -> dict[str, Any] | None:
        try:
            return self.rpc().getProcessInfo(name)
        except xmlrpc.client.Fault:
            return None
        except OSError:
            return None

    def state(self, name: str) -> str | None:
        info = self.info(name)
        return info["statename"] if info else None

    def all_info(self) -> list[dict[str, Any]]:
        try:
            return [i for i in self.rpc().getAllProcessInfo() if i["name"] != LISTENER]
        except (OSError, xmlrpc.client.Error):
            return []

    def start(self, name: str) -> None:
        try:
            self.rpc().startProcess(name, False)
        except xmlrpc.client.Fault as fault:
            if "ALREADY_STARTED" not in fault.faultString:
                raise

    def stop(self, name: str) -> None:
        """Stop ``name`` (its process group), waiting until it has exited."""
        try:
            self.rpc().stopProcess(name, True)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString and "BAD_NAME" not in fault.faultString:
                raise

    def signal(self, name: str, signame: str) -> None:
        self.rpc().signalProcess(name, signame)

    def restarts(self) -> dict[str, dict[str, Any]]:
        """Per service: unexpected exits supervisord restarted (``restarts``), and the last one's line."""
        out: dict[str, dict[str, Any]] = {}
        try:
            lines = self.restarts_log.read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            entry = out.setdefault(rec["name"], {"restarts": 0, "last": None})
            entry["restarts"] += rec.get("event") in ("exited", "backoff")  # both: supervisord starts it again
            entry["last"] = rec
        return out

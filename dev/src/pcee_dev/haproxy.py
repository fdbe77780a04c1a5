"""HAProxy in front of pcee's HTTP replicas: its configuration, its command and its runtime API.

One address (``PCEE_SERVE_PORT``, 127.0.0.1) for the whole fleet:

- requests go to the replica with the fewest in flight (``balance leastconn``); each replica's
  ``/health`` is checked every 500 ms (``rise 1 fall 2``), and a connection error marks it down at once
  (``observe layer4``); a request whose connection was refused, or closed before any answer (a replica
  killed under it), is retried on another replica (``retry-on conn-failure empty-response``,
  ``option redispatch``), so a client never sees it. The request is buffered for that
  (``option http-buffer-request``; bodies up to ``tune.bufsize``, 64 KiB; a larger one is forwarded,
  not retried). A request the replica answered, 503 included, is never retried;
- ``GET /health`` goes to the fleet's coordinator (``pcee_dev.fleet``, a Unix socket), which says
  which model versions are live on which replica; if it is down, a replica's own ``/health`` answers;
- its stats page (``/stats``) and Prometheus metrics (``/metrics``) on 127.0.0.1:``PCEE_SERVE_STATS_PORT``;
- its runtime API on a Unix socket (0600) in the state directory: the coordinator drains a replica
  there before reloading it.

Standard library only. The binary is Debian's ``haproxy`` (``scripts/ensure_haproxy.sh``).
"""

from __future__ import annotations

import csv
import io
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
BACKEND = "replicas"
BUFSIZE = 65536  # a request retried on another replica must fit in one buffer


@dataclass(frozen=True)
class Replica:
    name: str  # the service's name: also its server name in HAProxy
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None)
    if found is None:
        raise RuntimeError(
            "no haproxy binary: run `make setup` (scripts/ensure_haproxy.sh installs Debian's haproxy) "
            "or `apt-get install haproxy`"
        )
    return found


def config(port: int, stats_port: int, replicas: list[Replica], admin_socket: Path, fleet_socket: Path) -> str:
    """The configuration text (see the module docstring for what each part does)."""
    check = "check observe layer4 error-limit 1 on-error mark-down"
    servers = "\n".join(f"    server {r.name} {HOST}:{r.port} {check}" for r in replicas)
    backups = "\n".join(f"    server {r.name} {HOST}:{r.port} backup {check}" for r in replicas)
    return f"""# written by pcee_dev.haproxy (make up): the one address of pcee's HTTP replicas
global
    maxconn 2048
    tune.bufsize {BUFSIZE}
    stats socket {admin_socket} mode 600 level admin
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    option dontlog-normal
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout http-request 10s
    timeout http-keep-alive 60s
    timeout queue 30s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    option http-buffer-request
    default-server inter 500ms fastinter 250ms downinter 500ms rise 1 fall 2

frontend pcee
    bind {HOST}:{port}
    use_backend fleet_health if {{ path /health }} {{ method GET }}
    default_backend {BACKEND}

backend {BACKEND}
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
{servers}

backend fleet_health
    option httpchk GET /health
    http-check expect status 200
    timeout check 5s
    server fleet unix@{fleet_socket} check inter 2s fall 3
{backups}

frontend stats
    bind {HOST}:{stats_port}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /stats
    stats refresh 5s
    stats show-legends
"""


def command(config_path: Path) -> list[str]:
    """HAProxy in the foreground (``-db``), as supervisord runs it."""
    return [binary(), "-db", "-f", str(config_path)]


def check_config(config_path: Path) -> str | None:
    """None when HAProxy accepts the configuration (``haproxy -c``), else its complaint."""
    import subprocess

    proc = subprocess.run([binary(), "-c", "-q", "-f", str(config_path)], capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()


class Runtime:
    """HAProxy's runtime API on its admin socket: server states, drain, ready."""

    def __init__(self, admin_socket: Path) -> None:
        self.path = str(admin_socket)

    def command(self, line: str, timeout: float = 5.0) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.path)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def servers(self, backend: str = BACKEND) -> dict[str, dict[str, str]]:
        """Per server of ``backend``: its ``show stat`` row (``status``: UP, DOWN, DRAIN, MAINT, ...;
        ``scur``: requests in flight; ``check_status``, ...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            r["svname"]: r for r in rows if r.get("pxname") == backend and r["svname"] not in ("FRONTEND", "BACKEND")
        }

    def set_state(self, server: str, state: str, backend: str = BACKEND) -> None:
        """``ready``, ``drain`` (no new requests; those in flight finish) or ``maint``."""
        out = self.command(f"set server {backend}/{server} state {state}").strip()
        if out:
            raise RuntimeError(f"haproxy refused `set server {backend}/{server} state {state}`: {out}")


def main(argv: list[str] | None = None) -> None:
    """``python -m pcee_dev.haproxy ...``: write the configuration, check it, become HAProxy (exec)."""
    import argparse
    import os

    p = argparse.ArgumentParser(description="HAProxy in front of pcee's replicas (make up)")
    p.add_argument("--config", type=Path, required=True, help="where to write the configuration")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--stats-port", type=int, required=True)
    p.add_argument("--replica", action="append", required=True, help="NAME=PORT, one per replica")
    p.add_argument("--admin-socket", type=Path, required=True)
    p.add_argument("--fleet-socket", type=Path, required=True)
    args = p.parse_args(argv)
    replicas = [Replica(name, int(port)) for name, port in (r.split("=", 1) for r in args.replica)]
    args.config.parent.mkdir(parents=True, exist_ok=True)
    args.config.write_text(config(args.port, args.stats_port, replicas, args.admin_socket, args.fleet_socket))
    problem = check_config(args.config)
    if problem:
        raise SystemExit(f"haproxy refuses {args.config}: {problem}")
    cmd = command(args.config)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()

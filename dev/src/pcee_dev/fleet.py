"""The serving fleet's coordinator (``python -m pcee_dev.fleet``; ``make up`` runs it as ``fleet``).

- **Rolling reload.** It polls the model source the replicas serve (the registry's ``@champion``, or
  a bundle directory) every ``--poll`` seconds; the replicas do not poll themselves. When the source
  names a version a replica does not serve, the replicas are reloaded one at a time: drained in
  HAProxy (no new requests; those in flight finish) while another replica is up, sent SIGHUP (the
  service reloads in-process, :meth:`pcee.serving.app.Service.request_reload`), waited for until their
  ``/health`` names the new version, then made ready again. No request is refused on the way.
- **The fleet's /health.** HAProxy sends ``GET /health`` of the one address here (a Unix socket): the
  first live replica's own ``/health``, plus ``fleet``: each replica's state in HAProxy and version,
  ``versions_live`` (the versions of the replicas taking requests), ``target_version`` and whether a
  rollout is under way. 503 when no replica takes requests.

Standard library and httpx, plus the model source of :mod:`pcee.serving.model_source`.
"""

from __future__ import annotations

import argparse
import json
import socketserver
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx

from pcee_dev.haproxy import Replica, Runtime
from pcee_dev.services.supervisor import Supervisor

LIVE = ("UP", "UP 1/2", "NOLB")  # HAProxy states in which a server takes requests
RELOAD_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 30.0
CACHE_S = 0.1  # /health callers share one look at the replicas per 100 ms


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} fleet: {msg}", flush=True)


class Fleet:
    def __init__(self, replicas: list[Replica], runtime: Runtime, supervisor: Supervisor, source: Any) -> None:
        self.replicas = replicas
        self.runtime = runtime
        self.supervisor = supervisor
        self.source = source
        self.target: str | None = None
        self.rolling: str | None = None  # the replica being reloaded
        self._pool = ThreadPoolExecutor(max(2, len(replicas)))
        self._lock = threading.Lock()
        # each replica's version at its last answer: a replica HAProxy sends requests to serves it even
        # while one /health of it is slow (a busy machine), so it stays live
        self._versions: dict[str, str] = {}
        self._snapshot: tuple[int, dict[str, Any]] = (503, {})
        self._snapshot_at = -1e9

    # -- what is live
    def replica_health(self, r: Replica) -> dict[str, Any] | None:
        try:
            resp = httpx.get(f"{r.url}/health", timeout=2.0)
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        body = resp.json()
        self._versions[r.name] = str(body.get("model_version"))
        return body

    def states(self) -> dict[str, str]:
        try:
            return {name: row.get("status", "?") for name, row in self.runtime.servers().items()}
        except OSError:
            return {}

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        """The fleet's /health: status code and body (computed at most every ``CACHE_S``)."""
        with self._lock:
            if time.monotonic() - self._snapshot_at > CACHE_S:
                self._snapshot = self._compute()
                self._snapshot_at = time.monotonic()
            return self._snapshot

    def _compute(self) -> tuple[int, dict[str, Any]]:
        states = self.states()
        healths = list(self._pool.map(self.replica_health, self.replicas))
        rows = []
        for r, h in zip(self.replicas, healths, strict=True):
            rows.append(
                {
                    "name": r.name,
                    "url": r.url,
                    "haproxy": states.get(r.name, "?"),
                    "model_version": self._versions.get(r.name) if h or states.get(r.name) in LIVE else None,
                    "healthy": h is not None,
                }
            )
        live = [row for row in rows if row["model_version"] is not None and row["haproxy"] in LIVE]
        fleet = {
            "versions_live": sorted({str(row["model_version"]) for row in live}),
            "observed_at": time.monotonic(),  # when these states and versions were read (CLOCK_MONOTONIC)
            "replicas": rows,
            "target_version": self.target,
            "rolling": self.rolling,
        }
        answered = [h for row, h in zip(rows, healths, strict=True) if h is not None and row in live]
        first = answered[0] if answered else None
        if first is None:
            return 503, {"status": "unavailable", "detail": "no replica takes requests", "fleet": fleet}
        return 200, {**first, "fleet": fleet}

    # -- rolling reload
    def _wait(self, cond: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def reload_one(self, r: Replica, target: str) -> None:
        others = [o for o in self.replicas if o != r and self.states().get(o.name) in LIVE]
        self.rolling = r.name
        self._snapshot_at = -1e9  # the next /health looks again
        drained = bool(others)
        try:
            if drained:  # with no other replica up, it keeps taking requests: it reloads in-process anyway
                self.runtime.set_state(r.name, "drain")
                if not self._wait(lambda: self.runtime.servers().get(r.name, {}).get("scur") == "0", DRAIN_TIMEOUT_S):
                    log(
                        f"{r.name}: requests still in flight after {DRAIN_TIMEOUT_S:.0f} s of draining; reloading anyway"
                    )
            self.supervisor.signal(r.name, "HUP")
            ok = self._wait(lambda: (self.replica_health(r) or {}).get("model_version") == target, RELOAD_TIMEOUT_S)
            log(f"{r.name}: {'now serves' if ok else 'did NOT reach'} version {target}")
        finally:
            if drained:
                self.runtime.set_state(r.name, "ready")
                self._wait(lambda: self.states().get(r.name) in LIVE, 10.0)
            self.rolling = None
            self._snapshot_at = -1e9

    def roll(self) -> None:
        """Bring every replica to the source's current version, one at a time."""
        try:
            target = self.source.current_version()
        except Exception as err:  # noqa: BLE001 - the registry may be down: keep serving, try again later
            log(f"model source unavailable: {err}")
            return
        self.target = target
        for r in self.replicas:
            h = self.replica_health(r)
            if h is None or h.get("model_version") == target:
                continue  # down (supervisord restarts it with the current version) or current
            log(f"{r.name}: version {h.get('model_version')} -> {target}")
            self.reload_one(r, target)

    def run(self, poll_s: float, stop: threading.Event) -> None:
        while not stop.wait(poll_s):
            self.roll()


def _handler(fleet: Fleet) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def address_string(self) -> str:  # a Unix socket has no client address
            return "haproxy"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] != "/health":
                code, body = 404, {"detail": "the fleet answers GET /health only"}
            else:
                code, body = fleet.snapshot()
            data = json.dumps(body).encode()
            try:
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # HAProxy's health check hangs up once it has read the status line

    return Handler


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def model_source(args: argparse.Namespace) -> Any:
    from pcee.serving.model_source import LocalBundleSource, MlflowAliasSource

    if args.bundle:
        return LocalBundleSource(Path(args.bundle))
    return MlflowAliasSource(args.model_name, alias="champion")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pcee's serving fleet coordinator (make up)")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--replica", action="append", required=True, help="NAME=PORT, one per replica")
    p.add_argument("--admin-socket", type=Path, required=True, help="HAProxy's runtime API")
    p.add_argument("--health-socket", type=Path, required=True, help="where to answer the fleet's /health")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between looks at the model source (0: never)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-name", help="the registered model whose @champion the replicas serve")
    source.add_argument("--bundle", help="the bundle directory the replicas serve")
    args = p.parse_args(argv)
    replicas = [Replica(name, int(port)) for name, port in (r.split("=", 1) for r in args.replica)]
    fleet = Fleet(replicas, Runtime(args.admin_socket), Supervisor(args.state_dir), model_source(args))
    args.health_socket.unlink(missing_ok=True)
    server = UnixHTTPServer(str(args.health_socket), _handler(fleet))
    stop = threading.Event()
    if args.poll > 0:
        threading.Thread(target=fleet.run, args=(args.poll, stop), name="fleet-roll", daemon=True).start()
    log(f"{len(replicas)} replicas, /health on {args.health_socket}, source polled every {args.poll:g} s")
    try:
        server.serve_forever()
    finally:
        stop.set()
        args.health_socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

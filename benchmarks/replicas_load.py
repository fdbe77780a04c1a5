"""Several serving replicas on one traffic store: R real uvicorn servers (``python -m pcee.cli serve``)
on consecutive free ports, all logging to ONE store, C concurrent clients spreading n requests
round-robin over them. Checks that every request answered 200 is in the store exactly once.

    uv run python benchmarks/replicas_load.py [--store sqlite postgres] [--traffic-url URL]
                                              [--replicas 2] [--clients 4] [--n 1000] [--reps 3]
                                              [--kill-one] [--bundle DIR]

``--store sqlite``: a fresh SQLite file per rep (WAL; the replicas' writers take turns on its lock).
``--store postgres``: ``--traffic-url`` (an existing server; rows already there are left alone and
not counted), else a local PostgreSQL server this script starts (:mod:`pcee_dev.postgres`: initdb,
127.0.0.1, a free port, a generated password, as the ``postgres`` OS user when run as root, fsync on)
with a fresh database per rep, and stops at the end. Both: ``--store sqlite postgres`` (one table).

Requests go to the replicas in turn (request i starts at replica i mod R). A transport error
(connection refused or cut) marks that replica dead for the client, and the request is retried on the
next live replica ("failovers"); a request no replica answered counts as an error. ``--kill-one``
sends ``kill -9`` to replica 1 once a third of the requests are answered: its in-flight requests fail
over, and every request answered 200 before or after must still be in the store.

Without ``--bundle`` it builds the same bundle as ``serving_load.py`` (small-cnn, random weights,
PCEE on digits). Table: requests, errors, acknowledged (200) answers, rows logged, duplicate and
missing request ids are totals over the reps; req/s, p50 and p99 (client-side, from the first
attempt) are medians over the reps. Rows can exceed answers only with ``--kill-one`` (a row committed
whose answer was lost with the process; its request was retried elsewhere under a new id).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from benchmarks.harness import consecutive_free_ports, free_port, request_bodies, serve_command, wait_http
from benchmarks.serving_load import build_default_bundle
from pcee.serving.auth import bearer_header, client_token
from pcee.settings import Settings
from pcee.traffic.loadgen import closed_loop
from pcee_dev.proc import spawn, stop_group

HEALTH_TIMEOUT_S = 120.0


# --- the store ------------------------------------------------------------------------------------


def local_postgres(tmp: Path):
    """A throwaway PostgreSQL server (:class:`pcee_dev.postgres.PostgresServer`: 127.0.0.1, a free
    port, a generated password, as the ``postgres`` OS user when we are root), durable (fsync on) like
    the one ``make up`` starts; its files under ``tmp``, which it must be able to traverse."""
    from pcee_dev.postgres import PostgresServer

    root = Path(tempfile.mkdtemp(prefix="pcee-replicas-pg-"))  # not under a 0700 dir: the server's user enters it
    root.chmod(0o755)
    server = PostgresServer(root / "postgres", free_port(), log_path=tmp / "postgres.log")
    server.start()
    return server, root


# --- the replicas ---------------------------------------------------------------------------------


@dataclass
class Replica:
    proc: subprocess.Popen
    url: str
    log_path: Path


def start_replicas(
    bundle: Path, tmp: Path, traffic_url: str, count: int, poll_interval_s: float = 0.0
) -> list[Replica]:
    """``count`` servers on consecutive free ports, started together, all logging to
    ``traffic_url``; returns once every one answers /health (else stops them all and raises).
    ``poll_interval_s`` > 0: each follows the bundle directory (reloads when its content changes)."""
    replicas: list[Replica] = []
    for port in consecutive_free_ports(count):
        log_path = tmp / f"replica-{port}.log"
        cmd = serve_command(port, traffic_url, "--bundle", str(bundle), poll_interval_s=poll_interval_s)
        env = {**os.environ, "PCEE_STATE_DIR": str(tmp / "state"), "PYTHONUNBUFFERED": "1"}
        replicas.append(Replica(spawn(cmd, log_path, env), f"http://127.0.0.1:{port}", log_path))
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    try:
        for r in replicas:
            wait_http(f"{r.url}/health", max(1.0, deadline - time.monotonic()), r.proc, r.log_path)
    except BaseException:
        stop_replicas(replicas)
        raise
    return replicas


def stop_replicas(replicas: list[Replica]) -> None:
    for r in replicas:
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGTERM)
    for r in replicas:
        stop_group(r.proc, timeout=30)


# --- the clients ----------------------------------------------------------------------------------


@dataclass
class Run:
    """What one rep's clients saw."""

    acked: list[str] = field(default_factory=list)  # request ids answered 200
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    failovers: int = 0
    per_replica: Counter = field(default_factory=Counter)  # answers per replica index
    wall_s: float = 0.0
    killed_after: int | None = None  # answers when replica 1 was killed

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000.0) if self.latencies_s else float("nan")

    @property
    def throughput(self) -> float:
        return len(self.acked) / self.wall_s if self.wall_s else float("nan")


async def drive(replicas: list[Replica], bodies: list[bytes], n: int, clients: int, kill_at: int | None) -> Run:
    """``n`` single-sample predictions from ``clients`` closed-loop clients, round-robin over the
    replicas with fail-over; ``kill_at``: SIGKILL replica 1 after that many answers."""
    run = Run()
    dead: set[int] = set()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"content-type": "application/json", **bearer_header(client_token(Settings()))}
    conns = [httpx.AsyncClient(base_url=r.url, timeout=30, limits=limits) for r in replicas]

    async def step(i: int) -> None:
        turn = i  # request i starts at replica i mod R
        t0 = time.perf_counter()
        for _attempt in range(len(replicas)):
            live = [k for k in range(len(replicas)) if k not in dead]
            if not live:
                run.errors += 1
                run.error_kinds["no live replica"] += 1
                break
            k = live[turn % len(live)]
            turn += 1
            try:
                r = await conns[k].post("/predict", content=bodies[i % len(bodies)], headers=headers)
            except httpx.TransportError as err:  # the replica is gone: try the next one
                dead.add(k)
                run.failovers += 1
                run.error_kinds[f"{type(err).__name__} (failed over)"] += 1
                continue
            if r.status_code != 200:
                run.errors += 1
                run.error_kinds[f"HTTP {r.status_code}"] += 1
            else:
                run.acked.append(r.json()["request_id"])
                run.per_replica[k] += 1
                run.latencies_s.append(time.perf_counter() - t0)
                if kill_at is not None and run.killed_after is None and len(run.acked) >= kill_at:
                    run.killed_after = len(run.acked)
                    os.kill(replicas[0].proc.pid, signal.SIGKILL)  # mid-load: others are in flight
            break
        else:
            run.errors += 1
            run.error_kinds["every replica failed"] += 1

    try:
        run.wall_s = await closed_loop(n, clients, step)
    finally:
        await asyncio.gather(*(c.aclose() for c in conns))
    return run


async def warm_up(replicas: list[Replica], bodies: list[bytes], per_replica: int = 20) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        for r in replicas:
            for i in range(per_replica):
                resp = await client.post(
                    f"{r.url}/predict",
                    content=bodies[i],
                    headers={"content-type": "application/json", **bearer_header(client_token(Settings()))},
                )
                resp.raise_for_status()


def logged_ids(url: str) -> Counter:
    """Request id -> number of rows with it (a duplicate would count 2; the primary key forbids it)."""
    from sqlalchemy import text

    from pcee.traffic.store import TrafficStore

    store = TrafficStore(url)
    try:
        with store.engine.connect() as conn:
            return Counter(
                {row[0]: row[1] for row in conn.execute(text("SELECT id, COUNT(*) FROM requests GROUP BY id"))}
            )
    finally:
        store.dispose()


@dataclass
class Check:
    run: Run
    rows: int  # rows logged during the measured load
    dup: int  # acknowledged ids answered twice or logged more than once
    missing: int  # acknowledged ids not in the store


def one_rep(bundle: Path, tmp: Path, url: str, args: argparse.Namespace, bodies: list[bytes]) -> Check:
    replicas = start_replicas(bundle, tmp, url, args.replicas)
    try:
        asyncio.run(warm_up(replicas, bodies))
        before = logged_ids(url)
        kill_at = args.n // 3 if args.kill_one else None
        run = asyncio.run(drive(replicas, bodies, args.n, args.clients, kill_at))
    finally:
        stop_replicas(replicas)
    after = logged_ids(url)
    new = Counter({rid: c - before.get(rid, 0) for rid, c in after.items() if c > before.get(rid, 0)})
    acked = Counter(run.acked)
    dup = sum(c - 1 for c in acked.values() if c > 1) + sum(new[rid] - 1 for rid in acked if new.get(rid, 0) > 1)
    missing = sum(1 for rid in acked if rid not in new)
    return Check(run, rows=sum(new.values()), dup=dup, missing=missing)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", nargs="+", choices=("sqlite", "postgres"), default=["sqlite"])
    ap.add_argument("--traffic-url", default=None, help="an existing PostgreSQL server for --store postgres")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--n", type=int, default=1000, help="requests per rep, all replicas together")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kill-one", action="store_true", help="kill -9 replica 1 a third of the way through")
    ap.add_argument("--bundle", type=Path, default=None)
    args = ap.parse_args()
    if args.replicas < 1 or args.clients < 1 or args.n < 1 or args.reps < 1:
        ap.error("--replicas, --clients, --n and --reps must be >= 1")
    if args.kill_one and args.replicas < 2:
        ap.error("--kill-one needs --replicas >= 2 (the others take over)")

    tmp = Path(tempfile.mkdtemp(prefix="pcee-replicas-bench-"))
    try:
        return _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, tmp: Path) -> int:
    bundle = args.bundle or build_default_bundle(tmp / "bundle")
    from pcee.data.datasets import load_dataset

    x = load_dataset("digits", seed=0).test.x.astype(np.float32)
    bodies = request_bodies(x)

    results: dict[str, list[Check]] = {}
    pg, pg_root = None, None
    try:
        # reps outer, stores inner: the machine's load swings, and both stores should see the same
        for rep in range(args.reps):
            for store in args.store:
                rep_dir = tmp / f"{store}-{rep}"
                rep_dir.mkdir()
                if store == "sqlite":
                    url = f"sqlite:///{rep_dir / 'traffic.db'}"
                elif args.traffic_url:
                    url = args.traffic_url
                else:
                    if pg is None:
                        pg, pg_root = local_postgres(tmp)
                    url = pg.create_database(f"replicas_{rep}")
                check = one_rep(bundle, rep_dir, url, args, bodies)
                r = check.run
                print(
                    f"  {store} rep {rep + 1}: {len(r.acked)} answered, {r.errors} errors, {r.failovers} failovers, "
                    f"{r.throughput:.0f} req/s, rows {check.rows}, dup {check.dup}, missing {check.missing}"
                    + (f", replica 1 killed after {r.killed_after} answers" if r.killed_after is not None else "")
                    + (f"; {dict(r.error_kinds)}" if r.error_kinds else ""),
                    flush=True,
                )
                results.setdefault(store, []).append(check)
    finally:
        if pg is not None:
            pg.stop()
            shutil.rmtree(pg_root or "", ignore_errors=True)

    med = statistics.median
    print(
        f"\nreplicas benchmark: small-cnn on digits, {args.replicas} replicas x {args.clients} clients x {args.n} "
        f"requests, round-robin{', replica 1 killed (kill -9) a third of the way' if args.kill_one else ''}; "
        f"counts are totals over {args.reps} rep(s), req/s and latencies medians; {os.cpu_count()} CPU cores"
    )
    head = (
        f"{'store':>8} {'replicas':>8} {'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'answered':>8} {'rows':>6} {'dup ids':>7} {'missing':>7}"
    )
    if args.kill_one:
        head += f" {'failovers':>9}"
    print(head)
    bad = 0
    for store, checks in results.items():
        runs = [c.run for c in checks]
        line = (
            f"{store:>8} {args.replicas:>8} {args.clients:>7} {args.n * len(checks):>8} "
            f"{sum(r.errors for r in runs):>6} {med(r.throughput for r in runs):>7.0f} "
            f"{med(r.percentile_ms(50) for r in runs):>7.2f} {med(r.percentile_ms(99) for r in runs):>7.2f} "
            f"{sum(len(r.acked) for r in runs):>8} {sum(c.rows for c in checks):>6} "
            f"{sum(c.dup for c in checks):>7} {sum(c.missing for c in checks):>7}"
        )
        if args.kill_one:
            line += f" {sum(r.failovers for r in runs):>9}"
        print(line)
        bad += sum(c.dup + c.missing for c in checks) + sum(r.errors for r in runs)
    print(
        "every answered (200) request id logged exactly once"
        if bad == 0
        else "FAILED: errors, or answered requests not logged exactly once (see above)"
    )
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

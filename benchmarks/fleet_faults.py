"""Fleet fault drills through the one address (issue 28): ``make up``'s serving fleet (HAProxy, the
coordinator, R replicas under supervisord) on a local PostgreSQL traffic store and an MLflow registry,
all on 127.0.0.1 under a temporary state directory, driven by C closed-loop clients; prints each goal
as PASS or FAIL.

    uv run python benchmarks/fleet_faults.py [--replicas 3] [--clients 8] [--n 5000] [--reps 3] [--quick]

1. **Throughput through the balancer**: the same clients, request bytes and count, alternately through
   HAProxy and spread round-robin over the replicas' own ports (the sum of the replicas measured
   directly), ``--reps`` pairs in alternating order; the ratio is the median of the per-pair ratios.
2. **kill -9 of a replica under load**: ``--n`` requests; replica ``http-2`` is killed once a third are
   answered. Client-visible errors, acknowledged request ids missing from the traffic store, and the
   seconds from the kill until HAProxy has the restarted replica UP again.
3. **Champion promotion under load**: ``--n`` requests; version 2 becomes ``@champion`` once a quarter
   are answered. Refused requests, and answers whose version was not live (listed by the address's
   ``/health``, polled every 100 ms) between the request and its answer.
4. **PostgreSQL restart under load** (``scripts/services.py restart postgres``, the manager's restart):
   ``--n`` requests, the restart once a third are answered; a probe connects every 50 ms. 503s outside
   the database's down window (from the restart to the probe's first success), other errors,
   acknowledged ids missing, and how long after the database answered serving answered 200 again.

The model: small-cnn on digits (random weights, PCEE δ = 0.5), registered twice (the same weights, two
versions). ``--quick`` is a smoke configuration (2 replicas, 600 requests, 1 pair): not a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.harness import build_digits_bundle, request_bodies
from benchmarks.http_clients import http_client
from pcee.traffic.loadgen import closed_loop
from pcee_dev.haproxy import Runtime
from pcee_dev.proc import consecutive_free_ports, free_port
from pcee_dev.services import manager
from pcee_dev.services.hooks import postgres as postgres_hook
from pcee_dev.services.hooks.serving import fleet_specs
from pcee_dev.services.supervisor import socket_path

MODEL = "pcee-fleet-faults"
GOALS = {  # name: (target, op)
    "kill: client-visible errors": (0, "=="),
    "kill: acknowledged ids missing from the store": (0, "=="),
    "kill: seconds until the replica is back": (10.0, "<="),
    "promotion: refused requests": (0, "=="),
    "promotion: answers with a version not live": (0, "=="),
    "postgres: 503s outside the down window": (0, "=="),
    "postgres: other errors": (0, "=="),
    "postgres: acknowledged ids missing from the store": (0, "=="),
    "postgres: seconds from the database answering to a 200": (2.0, "<="),
    "throughput: through the balancer / replicas directly (c=8)": (0.9, ">="),
}


def progress(msg: str) -> None:
    print(f"[fleet_faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Answer:
    sent: float
    received: float
    status: int
    request_id: str | None = None
    version: str | None = None
    error: str | None = None


@dataclass
class Load:
    """Every answer of one load run, in order of arrival."""

    answers: list[Answer] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def acked(self) -> list[str]:
        return [a.request_id for a in self.answers if a.status == 200 and a.request_id]

    def count(self, status: int) -> int:
        return sum(a.status == status for a in self.answers)


async def drive(urls: list[str], bodies: list[bytes], n: int, clients: int, on_ack: Any = None, start: int = 0) -> Load:
    """``n`` predictions from ``clients`` closed-loop clients; request ``i`` goes to ``urls[i % len]``;
    ``on_ack(k)`` after the k-th 200 (the drills' triggers)."""
    load = Load()
    async with http_client("aiohttp", clients, 60.0) as (post, transport_errors):

        async def step(i: int) -> None:
            t0 = time.monotonic()
            try:
                r = await post(f"{urls[i % len(urls)]}/predict", bodies[(start + i) % len(bodies)])
            except transport_errors as err:
                load.answers.append(Answer(t0, time.monotonic(), 0, error=type(err).__name__))
                return
            a = Answer(t0, time.monotonic(), r.status)
            if r.status == 200:
                out = json.loads(r.body)
                a.request_id, a.version = out["request_id"], str(out["model_version"])
            load.answers.append(a)
            if r.status == 200 and on_ack is not None:
                on_ack(len(load.acked))

        load.wall_s = await closed_loop(n, clients, step)
    return load


def logged_ids(url: str) -> set[str]:
    from sqlalchemy import text

    from pcee.traffic.store import TrafficStore

    store = TrafficStore(url)
    try:
        with store.engine.connect() as conn:
            return {row[0] for row in conn.execute(text("SELECT id FROM requests"))}
    finally:
        store.dispose()


class Poller(threading.Thread):
    """Calls ``probe()`` every ``interval`` s, keeping (time, result) until stopped."""

    def __init__(self, probe: Any, interval: float) -> None:
        super().__init__(daemon=True)
        self.probe, self.interval = probe, interval
        self.samples: list[tuple[float, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                self.samples.append((t, self.probe()))
            except Exception as err:  # noqa: BLE001 - a failed probe is a sample too
                self.samples.append((t, err))
            self.stop.wait(self.interval)


# --- the stack --------------------------------------------------------------------------------------


@dataclass
class Stack:
    cfg: manager.Config
    url: str
    replica_urls: list[str]
    traffic_url: str
    runtime: Runtime
    version_1: str = ""
    version_2: str = ""


def start_stack(root: Path, args: argparse.Namespace) -> Stack:
    state = root / "state"
    port = consecutive_free_ports(args.replicas + 2)[0]
    env = {
        "PCEE_STATE_DIR": str(state),
        "PCEE_DB": "postgres",
        "PCEE_POSTGRES_PORT": str(free_port()),
        "PCEE_MLFLOW_PORT": str(free_port()),
        "PCEE_MLFLOW_BACKEND_URI": f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
        "PCEE_SERVE_PORT": str(port),
        "PCEE_SERVE_REPLICAS": str(args.replicas),
        "PCEE_SERVE_POLL_S": "1",
        "PCEE_MODEL_NAME": MODEL,
        "OMP_NUM_THREADS": "1",
    }
    os.environ.update(env)
    for var in ("PCEE_SCALE_OUT", "PCEE_TRAFFIC_URL", "PCEE_POSTGRES_URL", "MLFLOW_TRACKING_URI"):
        os.environ.pop(var, None)
    cfg = manager.load_config()
    mlflow = next(s for s in manager.builtin_specs(cfg) if s.name == "mlflow")
    pg = [manager.ServiceSpec(**d) for d in postgres_hook.specs(cfg)]
    progress("starting PostgreSQL and MLflow")
    manager.up(cfg, specs=[*pg, mlflow])
    os.environ.update({"MLFLOW_TRACKING_URI": cfg.mlflow_url, "MLFLOW_REGISTRY_URI": cfg.mlflow_url})
    from pcee.registry import log_and_register, promote
    from pcee.settings import Settings

    versions = []
    for k in (1, 2):  # the same weights, two versions: a promotion moves the alias, not the answers
        bundle = build_digits_bundle(root / f"bundle-{k}", meta={"benchmark": "fleet_faults", "version": k})
        _, v = log_and_register(
            experiment="fleet-faults",
            run_name=f"fleet-faults-{k}",
            model_name=MODEL,
            bundle_dir=bundle,
            params={},
            metrics={},
            tags={"benchmark": "fleet_faults"},
            description="fleet_faults benchmark model",
        )
        versions.append(str(v))
    promote(MODEL, versions[0])
    s = Settings()
    specs = fleet_specs(
        cfg.state_dir, ["--model-name", MODEL], port, args.replicas, s.stats_port(), 1.0, cfg.client_env()
    )
    progress(f"starting {args.replicas} replicas, the coordinator and HAProxy on 127.0.0.1:{port}")
    manager.up(cfg, specs=[manager.ServiceSpec(**d) for d in specs])
    from pcee.stack import postgres

    return Stack(
        cfg,
        f"http://127.0.0.1:{port}",
        [f"http://127.0.0.1:{p}" for p in s.replica_ports()],
        postgres.traffic_url(s),
        Runtime(socket_path(cfg.state_dir, "haproxy.sock")),
        *versions,
    )


# --- the drills -------------------------------------------------------------------------------------


def throughput(stack: Stack, bodies: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    ratios, lb_rps, direct_rps = [], [], []
    asyncio.run(drive([stack.url], bodies, 8 * args.clients, args.clients))  # warm-up: connections, first batches
    for rep in range(args.reps):
        order = ("lb", "direct") if rep % 2 == 0 else ("direct", "lb")
        got = {}
        for kind in order:
            urls = [stack.url] if kind == "lb" else stack.replica_urls
            load = asyncio.run(drive(urls, bodies, args.n_throughput, args.clients))
            got[kind] = len(load.acked) / load.wall_s
        lb_rps.append(got["lb"])
        direct_rps.append(got["direct"])
        ratios.append(got["lb"] / got["direct"])
        progress(f"throughput pair {rep + 1}: balancer {got['lb']:.0f} req/s, direct {got['direct']:.0f} req/s")
    med = statistics.median
    return {"lb_rps": med(lb_rps), "direct_rps": med(direct_rps), "ratio": med(ratios), "ratios": ratios}


def kill_drill(stack: Stack, bodies: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    victim = manager.running_pid(stack.cfg, "http-2")
    assert victim is not None
    killed: list[float] = []

    def on_ack(k: int) -> None:
        if not killed and k >= args.n // 3:
            killed.append(time.monotonic())
            os.kill(victim, signal.SIGKILL)

    states = Poller(lambda: stack.runtime.servers()["http-2"]["status"], 0.1)
    states.start()
    load = asyncio.run(drive([stack.url], bodies, args.n, args.clients, on_ack))
    deadline = time.monotonic() + 300

    def returned() -> bool:
        down = next((t for t, s in states.samples if t > killed[0] and s != "UP"), None)
        return down is not None and any(t > down and s == "UP" for t, s in states.samples)

    while not returned() and time.monotonic() < deadline:
        time.sleep(0.1)
    states.stop.set()
    down = next((t for t, s in states.samples if t > killed[0] and s != "UP"), float("inf"))
    back = next((t - killed[0] for t, s in states.samples if t > down and s == "UP"), float("nan"))
    missing = set(load.acked) - logged_ids(stack.traffic_url)
    errors = [a for a in load.answers if a.status != 200]
    return {
        "errors": len(errors),
        "error_kinds": sorted({a.error or f"HTTP {a.status}" for a in errors}),
        "acked": len(load.acked),
        "missing": len(missing),
        "back_s": back,
        "rps": len(load.acked) / load.wall_s,
    }


def live_between(samples: list[tuple[float, set[str]]], t0: float, t1: float) -> set[str]:
    """The versions live at some moment of [t0, t1]: the last sample before t0 (its state held until the
    next one), every sample inside, and the first after t1 (a change may fall between two samples)."""
    before = [v for t, v in samples if t <= t0][-1:]
    inside = [v for t, v in samples if t0 < t <= t1]
    after = [v for t, v in samples if t > t1][:1]
    return set().union(*before, *inside, *after)


def promotion_drill(stack: Stack, bodies: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    from pcee.registry import promote

    promoted: list[float] = []

    def on_ack(k: int) -> None:
        if not promoted and k >= args.n // 4:
            promoted.append(time.monotonic())
            threading.Thread(target=promote, args=(MODEL, stack.version_2), daemon=True).start()

    def live() -> tuple[float, set[str]]:
        fleet = httpx.get(f"{stack.url}/health", timeout=5).json()["fleet"]
        return fleet["observed_at"], set(fleet["versions_live"])  # when the coordinator read them

    health = Poller(live, 0.1)
    health.start()
    load = asyncio.run(drive([stack.url], bodies, args.n, args.clients, on_ack))
    deadline = time.monotonic() + 180  # the rollout may outlast the load: wait for its end

    def rolled_out() -> bool:
        last = health.samples[-1][1] if health.samples else None
        return isinstance(last, tuple) and last[1] == {stack.version_2}

    while time.monotonic() < deadline and not rolled_out():
        time.sleep(0.2)
    health.stop.set()
    observed = {r[0]: r[1] for _, r in health.samples if isinstance(r, tuple)}  # one per snapshot
    samples = sorted(observed.items())
    not_live = sum(a.status == 200 and a.version not in live_between(samples, a.sent, a.received) for a in load.answers)
    done = next((t - promoted[0] for t, v in samples if promoted and t > promoted[0] and v == {stack.version_2}), None)
    return {
        "refused": sum(a.status != 200 for a in load.answers),
        "not_live": not_live,
        "answers_by_version": {
            v: sum(a.version == v for a in load.answers) for v in (stack.version_1, stack.version_2)
        },
        "rollout_s": float("nan") if done is None else done,
    }


def postgres_drill(stack: Stack, bodies: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    from pcee.stack.postgres import libpq_url_of

    dsn = libpq_url_of(stack.traffic_url.replace("+psycopg", ""))
    restart: dict[str, float] = {}

    def do_restart() -> None:
        manager.restart(stack.cfg, ["postgres"])
        restart["end"] = time.monotonic()

    def on_ack(k: int) -> None:
        if "begin" not in restart and k >= args.n // 3:
            restart["begin"] = time.monotonic()
            threading.Thread(target=do_restart, daemon=True).start()

    def answers() -> bool:
        with psycopg.connect(dsn, connect_timeout=1) as conn:
            conn.execute("SELECT 1")
        return True

    probe = Poller(answers, 0.05)
    probe.start()
    load = asyncio.run(drive([stack.url], bodies, args.n, args.clients, on_ack))
    while "end" not in restart:
        time.sleep(0.2)
    more = Load()
    while not any(a.status == 200 and a.received > restart["end"] for a in load.answers + more.answers):
        more.answers += asyncio.run(drive([stack.url], bodies, 20, 1)).answers  # until serving answers again
    probe.stop.set()
    first_down = next((t for t, ok in probe.samples if t >= restart["begin"] and ok is not True), restart["begin"])
    up_again = next((t for t, ok in probe.samples if t > first_down and ok is True), float("nan"))
    everything = load.answers + more.answers
    refused = [a for a in everything if a.status == 503]
    outside = [a for a in refused if not (restart["begin"] <= a.received <= up_again + 2.0)]
    first_ok = min(a.received for a in everything if a.status == 200 and a.received > up_again)
    acked = [a.request_id for a in everything if a.status == 200 and a.request_id]
    return {
        "down_s": up_again - first_down,
        "n_503": len(refused),
        "outside": len(outside),
        "other_errors": sum(a.status not in (200, 503) for a in everything),
        "missing": len(set(acked) - logged_ids(stack.traffic_url)),
        "recovery_s": max(0.0, first_ok - up_again),
        "last_503_after_up_s": max((a.received - up_again for a in refused), default=float("nan")),
    }


# --- the report -------------------------------------------------------------------------------------


def verdict(value: float, target: float, op: str) -> bool:
    if value != value:  # NaN: not measured
        return False
    return {"==": value == target, "<=": value <= target, ">=": value >= target}[op]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fleet fault drills through the one address")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--n", type=int, default=5000, help="requests of each fault drill")
    ap.add_argument("--n-throughput", type=int, default=2000, help="requests of each throughput measurement")
    ap.add_argument("--reps", type=int, default=3, help="throughput pairs (balancer, direct)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 replicas, 600 requests, 1 pair")
    args = ap.parse_args(argv)
    if args.quick:
        args.replicas, args.n, args.n_throughput, args.reps = 2, 600, 300, 1
    if args.replicas < 2 or args.clients < 1 or args.n < 100 or args.reps < 1:
        ap.error("--replicas >= 2, --clients >= 1, --n >= 100, --reps >= 1")
    root = Path(tempfile.mkdtemp(prefix="pcee-fleet-faults-"))
    root.chmod(0o755)  # PostgreSQL runs as the postgres OS user when we are root: it must enter the state dir
    t0 = time.monotonic()
    cfg = None
    try:
        stack = start_stack(root, args)
        cfg = stack.cfg
        from pcee.data.datasets import load_dataset

        bodies = request_bodies(load_dataset("digits", seed=0).test.x.astype(np.float32))
        progress("throughput: balancer vs replicas directly")
        tp = throughput(stack, bodies, args)
        progress("kill -9 of http-2 under load")
        kill = kill_drill(stack, bodies, args)
        progress("promotion under load")
        promo = promotion_drill(stack, bodies, args)
        progress("PostgreSQL restart under load")
        pg = postgres_drill(stack, bodies, args)
    finally:
        if cfg is not None:
            manager.down(cfg)
        shutil.rmtree(root, ignore_errors=True)
    measured = {
        "kill: client-visible errors": kill["errors"],
        "kill: acknowledged ids missing from the store": kill["missing"],
        "kill: seconds until the replica is back": kill["back_s"],
        "promotion: refused requests": promo["refused"],
        "promotion: answers with a version not live": promo["not_live"],
        "postgres: 503s outside the down window": pg["outside"],
        "postgres: other errors": pg["other_errors"],
        "postgres: acknowledged ids missing from the store": pg["missing"],
        "postgres: seconds from the database answering to a 200": pg["recovery_s"],
        "throughput: through the balancer / replicas directly (c=8)": tp["ratio"],
    }
    print(
        f"\nfleet faults: {args.replicas} replicas behind HAProxy, {args.clients} clients, {args.n} requests per drill, "
        f"PostgreSQL traffic store, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}, "
        f"{time.monotonic() - t0:.0f} s{' (--quick: not a measurement)' if args.quick else ''}"
    )
    print(f"{'goal':<60} {'measured':>10} {'target':>9}  verdict")
    failed = 0
    for name, (target, op) in GOALS.items():
        value = float(measured[name])
        ok = verdict(value, target, op)
        failed += not ok
        print(f"{name:<60} {value:>10.3g} {op + ' ' + format(target, 'g'):>9}  {'PASS' if ok else 'FAIL'}")
    print(
        f"\nkill: {kill['acked']} answered at {kill['rps']:.0f} req/s{'; errors ' + str(kill['error_kinds']) if kill['errors'] else ''}. "
        f"promotion: answers by version {promo['answers_by_version']}, every replica on v{stack.version_2} "
        f"{promo['rollout_s']:.1f} s after the alias moved. postgres: down {pg['down_s']:.1f} s (probe), "
        f"{pg['n_503']} answered 503, the last {pg['last_503_after_up_s']:.2f} s after it answered again. "
        f"throughput: {tp['lb_rps']:.0f} req/s through HAProxy vs {tp['direct_rps']:.0f} direct "
        f"(per pair: {', '.join(f'{r:.2f}' for r in tp['ratios'])})."
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark: p50/p99 latency and requests/s at concurrency 1 and 8 against real local
servers (uvicorn subprocesses), with the traffic store's logging off vs on: the cost of logging,
as a share of p50 at each concurrency (goal < 5%).

    uv run python benchmarks/serving_load.py [--bundle DIR] [--n 2000] [--reps 5] [--block 10]
                                             [--concurrency 1 8] [--synchronous NORMAL] [--max-wait-ms MS]
                                             [--client httpx|aiohttp]

Without ``--bundle`` it builds one: a small-cnn (random weights, digits shape) with a PCEE policy
fitted on its digits validation outputs. The machine is shared and its load swings (within
seconds) by more than the effect measured, so each rep starts both servers (logging off and on) side
by side and, for each concurrency C, sends them ``--n`` requests each in alternating short blocks of
``--block`` requests per client (C x block requests: off, on, on, off, ...): both see the same load.
Each cell's p50/p99 pools its blocks; req/s is its requests over the time its blocks took. The table
shows medians over the reps, and the logging cost is the median of the per-rep ratios of p50 (on vs
off from the same rep).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

from benchmarks.harness import Cell, build_digits_bundle, drive, free_port, request_bodies, serve_command, wait_http
from benchmarks.http_clients import CLIENTS, Post, http_client
from pcee_dev.proc import stop_group


def build_default_bundle(out: Path) -> Path:
    """small-cnn, random weights (seed 0), PCEE δ = 0.5 on digits: the bundle of the serving benchmarks."""
    return build_digits_bundle(out, delta=0.5)


def start(bundle: Path, tmp: Path, log_on: bool, synchronous: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [*serve_command(port, f"sqlite:///{tmp / f'traffic-{port}.db'}", "--bundle", str(bundle)), *extra]
    if not log_on:
        args.append("--no-log")
    env = {**os.environ, "PCEE_STATE_DIR": str(tmp / "state"), "PCEE_TRAFFIC_SYNCHRONOUS": synchronous}
    log = tmp / f"server-{port}.log"
    proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 600, proc, log)  # minutes on a loaded machine
    except RuntimeError:
        proc.kill()
        raise
    return proc, url


async def run_block(post: Post, url: str, bodies: list[bytes], start: int, n: int, conc: int) -> Cell:
    """``n`` single-sample predictions from ``conc`` closed-loop clients on one kept-alive client."""
    cell = await drive(post, (), f"{url}/predict", bodies, n, conc, results_key=None, start=start)
    if cell.errors:
        raise RuntimeError(f"errors: {dict(cell.error_kinds)}")
    return cell


async def interleaved(
    urls: dict[bool, str], bodies: list[bytes], n: int, block: int, conc: int, client: str = "httpx"
) -> dict[bool, Cell]:
    """``n`` requests to each server in alternating blocks (off, on, on, off, ...), one ``client``
    session per server."""
    cells = {log_on: Cell() for log_on in urls}
    async with http_client(client, conc) as (off_post, _), http_client(client, conc) as (on_post, _):
        clients = {False: off_post, True: on_post}
        for log_on in urls:  # warm-up: connections open, first requests paid
            await run_block(clients[log_on], urls[log_on], bodies, 0, 4 * conc, conc)
        for b, start in enumerate(range(0, n, block)):
            order = (False, True) if b % 2 == 0 else (True, False)
            for log_on in order:
                got = await run_block(clients[log_on], urls[log_on], bodies, start, min(block, n - start), conc)
                cells[log_on].latencies_s += got.latencies_s
                cells[log_on].ok += got.ok
                cells[log_on].wall_s += got.wall_s
    return cells


def commit_p50_ms(url: str) -> float:
    """Median commit time from the server's histogram (bucket upper edge)."""
    text = httpx.get(f"{url}/metrics").text
    buckets = [
        (float(m.group(1)), int(m.group(2)))
        for m in re.finditer(r'pcee_store_commit_seconds_bucket\{le="([0-9.e+-]+)"\} (\d+)', text)
    ]
    total = int(re.search(r"pcee_store_commit_seconds_count (\d+)", text).group(1))
    if total == 0:
        return float("nan")
    for edge, count in buckets:
        if count >= total / 2:
            return edge * 1000
    return float("nan")


def main() -> int:
    from pcee.serving.auth import client_token
    from pcee.settings import Settings
    from pcee.traffic.loadgen import run_load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--n", type=int, default=2000, help="requests per cell (server and concurrency)")
    ap.add_argument(
        "--block", type=int, default=10, help="requests per client in a block; the servers alternate blocks"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--synchronous", default="NORMAL", choices=("NORMAL", "FULL"))
    ap.add_argument("--max-wait-ms", type=float, default=None)
    ap.add_argument(
        "--client",
        choices=CLIENTS,
        default="httpx",
        help="the load generator (default httpx, as the issue measured; aiohttp costs the client ~1/5 of its CPU)",
    )
    args = ap.parse_args()
    extra = [] if args.max_wait_ms is None else ["--max-wait-ms", str(args.max_wait_ms)]

    tmp = Path(tempfile.mkdtemp(prefix="pcee-serving-bench-"))
    bundle = args.bundle or build_default_bundle(tmp / "bundle")
    from pcee.data.datasets import load_dataset

    test = load_dataset("digits", seed=0).test
    x, y = test.x.astype(np.float32), test.y
    bodies = request_bodies(x)

    cells: dict[tuple[bool, int], list[Cell]] = {}
    commits: list[float] = []
    for _rep in range(args.reps):
        procs: list[subprocess.Popen] = []
        try:
            urls = {}
            for log_on in (False, True):
                proc, urls[log_on] = start(bundle, tmp, log_on, args.synchronous, extra)
                procs.append(proc)
            for log_on in (False, True):
                token = client_token(Settings())
                asyncio.run(run_load(urls[log_on], x, y, n=200, concurrency=8, token=token))  # warm-up
            for conc in args.concurrency:
                blocks = interleaved(urls, bodies, args.n, args.block * conc, conc, args.client)
                for log_on, cell in asyncio.run(blocks).items():
                    cells.setdefault((log_on, conc), []).append(cell)
            commits.append(commit_p50_ms(urls[True]))
        finally:
            for proc in procs:
                stop_group(proc, timeout=30)

    med = statistics.median
    print(
        f"\nserving benchmark: small-cnn on digits, {args.n} requests per cell in blocks of {args.block} per client "
        f"alternating off/on, median of {args.reps} rep(s), "
        f"SQLite WAL synchronous={args.synchronous}, client {args.client}, max_wait_ms={'2 (default)' if args.max_wait_ms is None else f'{args.max_wait_ms:g}'}, "
        f"{os.cpu_count()} CPU cores"
    )
    print(
        f"{'conc':>4} {'p50 off':>8} {'p50 on':>8} {'log cost':>9} {'p99 off':>8} {'p99 on':>8} "
        f"{'req/s off':>9} {'req/s on':>9}"
    )
    for conc in args.concurrency:
        off, on = cells[(False, conc)], cells[(True, conc)]
        p50 = [med([r.p(50) for r in runs]) for runs in (off, on)]
        p99 = [med([r.p(99) for r in runs]) for runs in (off, on)]
        rps = [med([r.rps for r in runs]) for runs in (off, on)]
        cost = med([100 * (b.p(50) - a.p(50)) / a.p(50) for a, b in zip(off, on, strict=True)])
        print(
            f"{conc:>4} {p50[0]:>8.2f} {p50[1]:>8.2f} {cost:>+8.1f}% {p99[0]:>8.2f} {p99[1]:>8.2f} "
            f"{rps[0]:>9.1f} {rps[1]:>9.1f}"
        )
    print("\nlog cost: p50 on vs off as a share of p50 off, median of the per-rep ratios (goal < 5%); per rep:")
    for conc in args.concurrency:
        ratios = [
            100 * (b.p(50) - a.p(50)) / a.p(50) for a, b in zip(cells[(False, conc)], cells[(True, conc)], strict=True)
        ]
        print(f"  concurrency {conc}: {', '.join(f'{r:+.1f}%' for r in ratios)}")
    print(f"server-side commit time per transaction (median bucket edge): <= {med(commits):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

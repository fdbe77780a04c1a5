"""Serving benchmark: p50/p99 latency and requests/s at concurrency 1 and 8 against a real local
server (uvicorn subprocess), with the traffic store's logging off vs on (the cost of logging;
goal < 5% of p50).

    uv run python benchmarks/serving_load.py [--bundle DIR] [--n 2000] [--reps 2] [--synchronous NORMAL]

Without ``--bundle`` it builds one: a small-cnn (random weights, digits shape) with a PCEE policy
fitted on its digits validation outputs. Each (logging, concurrency) cell is run ``--reps`` times
alternating off/on, and the median is reported, because this machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_default_bundle(out: Path) -> Path:
    import torch

    from pcee.bundle import ModelBundle
    from pcee.data.datasets import load_dataset
    from pcee.models.flops import measure_exit_flops
    from pcee.models.registry import build_model
    from pcee.policies.registry import build_policy

    torch.manual_seed(0)
    model = build_model("small-cnn").eval()
    splits = load_dataset("digits", seed=0)
    with torch.inference_mode():
        logits = torch.stack(model(torch.as_tensor(splits.val.x)), dim=1).numpy()
    flops = measure_exit_flops(model, splits.input_shape)
    policy = build_policy("pcee", delta=0.5, min_count=1).fit(logits, splits.val.y, flops)
    ModelBundle(model, policy, flops, {"dataset": "digits", "input_shape": list(splits.input_shape)}).save(out)
    return out


def start(bundle: Path, tmp: Path, log_on: bool, synchronous: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "pcee.serving", "--bundle", str(bundle), "--port", str(port), "--poll-interval", "0",
            "--traffic-url", f"sqlite:///{tmp / f'traffic-{port}.db'}", *extra]
    if not log_on:
        args.append("--no-log")
    env = {**os.environ, "PCEE_STATE_DIR": str(tmp / "state"), "PCEE_TRAFFIC_SYNCHRONOUS": synchronous}
    proc = subprocess.Popen(args, stdout=open(tmp / f"server-{port}.log", "wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp / f"server-{port}.log").read_text())
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def commit_p50_ms(url: str) -> float:
    """Median commit time from the server's histogram (bucket upper edge)."""
    text = httpx.get(f"{url}/metrics").text
    buckets = [(float(m.group(1)), int(m.group(2))) for m in re.finditer(r'pcee_store_commit_seconds_bucket\{le="([0-9.e+-]+)"\} (\d+)', text)]
    total = int(re.search(r"pcee_store_commit_seconds_count (\d+)", text).group(1))
    if total == 0:
        return float("nan")
    for edge, count in buckets:
        if count >= total / 2:
            return edge * 1000
    return float("nan")


def main() -> int:
    from pcee.traffic.loadgen import run_load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--n", type=int, default=2000, help="requests per cell")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--synchronous", default="NORMAL", choices=("NORMAL", "FULL"))
    ap.add_argument("--max-wait-ms", type=float, default=None)
    args = ap.parse_args()
    extra = [] if args.max_wait_ms is None else ["--max-wait-ms", str(args.max_wait_ms)]

    tmp = Path(tempfile.mkdtemp(prefix="pcee-serving-bench-"))
    bundle = args.bundle or build_default_bundle(tmp / "bundle")
    from pcee.data.datasets import load_dataset

    test = load_dataset("digits", seed=0).test
    x, y = test.x.astype(np.float32), test.y

    cells: dict[tuple[bool, int], list] = {}
    commits: list[float] = []
    for rep in range(args.reps):
        for log_on in (False, True):
            proc, url = start(bundle, tmp, log_on, args.synchronous, extra)
            try:
                asyncio.run(run_load(url, x, y, n=200, concurrency=8))  # warm-up
                for conc in (1, 8):
                    res = asyncio.run(run_load(url, x, y, n=args.n, concurrency=conc))
                    assert res.errors == 0, res.error_kinds
                    cells.setdefault((log_on, conc), []).append(res)
                if log_on:
                    commits.append(commit_p50_ms(url))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)

    def med(vals):
        return statistics.median(vals)

    print(f"\nserving benchmark: small-cnn on digits, {args.n} requests per cell, median of {args.reps} run(s), "
          f"SQLite WAL synchronous={args.synchronous}, {os.cpu_count()} CPU cores")
    print(f"{'logging':<8} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    summary = {}
    for (log_on, conc), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        p50 = med([r.percentile_ms(50) for r in runs])
        p99 = med([r.percentile_ms(99) for r in runs])
        rps = med([r.throughput for r in runs])
        summary[(log_on, conc)] = p50
        print(f"{'on' if log_on else 'off':<8} {conc:>4} {p50:>8.2f} {p99:>8.2f} {rps:>8.1f}")
    print("\ncost of logging (p50 on - p50 off, relative to p50 off; goal < 5%):")
    for conc in (1, 8):
        off, on = summary[(False, conc)], summary[(True, conc)]
        print(f"  concurrency {conc}: {on - off:+.2f} ms ({(on - off) / off * 100:+.1f}%)")
    print(f"  server-side commit time per batch (median bucket edge): <= {med(commits):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

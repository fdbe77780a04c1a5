"""The cost of request logging inside the service, without HTTP: the micro-batcher answering one
sample per request with the traffic store off vs on (SQLite, the service's defaults), from 1 and
from 8 concurrent submitters (closed loop: each submits its next request when the last is answered).

``serving_load.py`` measures the same thing end to end through uvicorn; this isolates what the
batcher and the store add, so a gap between the two points at the HTTP side.

    uv run python benchmarks/batcher_logging_cost.py [--n 2000] [--reps 5] [--block 10]
                                                     [--concurrency 1 8] [--max-wait-ms 0]

Uses the same bundle as ``serving_load.py`` (small-cnn, random weights, PCEE on digits). The
machine is shared and its load swings by more than the effect measured, so each rep runs two
batchers side by side (logging off and on) and, for each concurrency C, sends them ``--n`` requests
each in alternating short blocks of ``--block`` requests per submitter (C x block requests: off, on,
on, off, ...). The tables show medians over the reps, and the logging cost is the median of the
per-rep ratios (on vs off from the same rep).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.serving_load import build_default_bundle


async def _block(batcher, x: np.ndarray, start: int, n: int, conc: int) -> tuple[list[float], float]:
    """Round trips (s) of ``n`` requests from ``conc`` closed-loop submitters, and the block's wall time."""
    out: list[float] = []
    counter = iter(range(start, start + n))

    async def client() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await batcher.submit(x[i % len(x)][None])
            out.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(conc)))
    return out, time.perf_counter() - t0


async def _interleaved(
    served, x: np.ndarray, store, n: int, block: int, concurrency: list[int], max_wait_ms: float
) -> dict[tuple[bool, int], tuple[float, float, float]]:
    """(log_on, conc) -> (p50 ms, p99 ms, req/s) of two batchers, logging off and on, in alternating blocks."""
    from pcee.serving.batcher import MicroBatcher
    from pcee.serving.metrics import ServiceMetrics

    batchers = {
        log_on: MicroBatcher(
            lambda: served, store if log_on else None, ServiceMetrics(), max_wait_ms=max_wait_ms, seed=0
        )
        for log_on in (False, True)
    }
    for b in batchers.values():
        b.start()
    out = {}
    try:
        for b in batchers.values():  # warm-up
            await _block(b, x, 0, 200, 8)
        for conc in concurrency:
            times: dict[bool, list[float]] = {False: [], True: []}
            wall = {False: 0.0, True: 0.0}
            size = block * conc
            for k, start in enumerate(range(0, n, size)):
                for log_on in (False, True) if k % 2 == 0 else (True, False):
                    got, dt = await _block(batchers[log_on], x, start, min(size, n - start), conc)
                    times[log_on] += got
                    wall[log_on] += dt
            for log_on in (False, True):
                ms = np.asarray(times[log_on]) * 1000.0
                out[(log_on, conc)] = (
                    float(np.percentile(ms, 50)),
                    float(np.percentile(ms, 99)),
                    len(ms) / wall[log_on],
                )
    finally:
        for b in batchers.values():
            b.stop()
    return out


def main() -> int:
    import torch

    from pcee.bundle import ModelBundle
    from pcee.data.datasets import load_dataset
    from pcee.serving.model_source import ServedModel
    from pcee.traffic.store import TrafficStore

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="requests per run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--block", type=int, default=10, help="requests per submitter in a block; the batchers alternate blocks"
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-wait-ms", type=float, default=0.0, help="the batcher's max wait (the service's is 2)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="pcee-batcher-bench-"))
    bundle = ModelBundle.load(build_default_bundle(tmp / "bundle"))
    served = ServedModel(
        "1",
        bundle.runner(),
        tuple(bundle.meta["input_shape"]),
        "pcee",
        0.5,
        bundle.policy.num_exits_,
        target_accuracy=None,
        bundle_dir=tmp / "bundle",
    )
    x = load_dataset("digits", seed=0).test.x.astype(np.float32)

    # (log_on, conc) -> per-rep (p50, p99, req/s)
    cells: dict[tuple[bool, int], list[tuple[float, float, float]]] = {}
    for rep in range(args.reps):
        store = TrafficStore(f"sqlite:///{tmp / f'traffic-{rep}.db'}")
        got = asyncio.run(_interleaved(served, x, store, args.n, args.block, args.concurrency, args.max_wait_ms))
        store.dispose()
        for key, cell in got.items():
            cells.setdefault(key, []).append(cell)

    med = statistics.median
    print(
        f"micro-batcher round trip, one sample per request, {args.n} requests per cell in blocks of "
        f"{args.block} per submitter alternating off/on, median of {args.reps} rep(s), max_wait_ms={args.max_wait_ms:g}"
    )
    print(f"{'logging':<8} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for conc in args.concurrency:
        for log_on in (False, True):
            runs = cells[(log_on, conc)]
            p50, p99, rps = (med([r[k] for r in runs]) for k in range(3))
            print(f"{'on' if log_on else 'off':<8} {conc:>4} {p50:>8.3f} {p99:>8.3f} {rps:>8.1f}")
    print("\nlogging cost (p50 on - p50 off, relative to p50 off, median of per-rep ratios; goal < 5%):")
    for conc in args.concurrency:
        off, on = cells[(False, conc)], cells[(True, conc)]
        ratios = [100 * (b[0] - a[0]) / a[0] for a, b in zip(off, on, strict=True)]
        d_ms = med([b[0] - a[0] for a, b in zip(off, on, strict=True)])
        tput = med([100 * (b[2] - a[2]) / a[2] for a, b in zip(off, on, strict=True)])
        print(
            f"  concurrency {conc}: {d_ms:+.3f} ms ({med(ratios):+.1f}% of p50; per rep "
            f"{', '.join(f'{r:+.0f}%' for r in ratios)}); req/s {tput:+.1f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

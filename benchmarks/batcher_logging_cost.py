"""The cost of request logging inside the service, without HTTP: the micro-batcher answering one
sample at a time with the traffic store off vs on (SQLite, the service's defaults).

``serving_load.py`` measures the same thing end to end through uvicorn; this isolates what the
batcher and the store add, so a gap between the two points at the HTTP side.

    uv run python benchmarks/batcher_logging_cost.py [--n 2000] [--reps 3]

Uses the same bundle as ``serving_load.py`` (small-cnn, random weights, PCEE on digits).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_load import build_default_bundle  # noqa: E402


async def _round_trips_ms(served, x: np.ndarray, store, n: int) -> np.ndarray:
    from pcee.serving.batcher import MicroBatcher
    from pcee.serving.metrics import ServiceMetrics

    batcher = MicroBatcher(lambda: served, store, ServiceMetrics(), max_wait_ms=0.0, store_fraction=0.1, seed=0)
    batcher.start()
    try:
        for i in range(200):  # warm-up
            await batcher.submit(x[i % len(x)][None])
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            await batcher.submit(x[i % len(x)][None])
            times.append(time.perf_counter() - t0)
    finally:
        batcher.stop()
    return np.asarray(times) * 1000.0


def main() -> int:
    import torch

    from pcee.bundle import ModelBundle
    from pcee.data.datasets import load_dataset
    from pcee.serving.model_source import ServedModel
    from pcee.traffic.store import TrafficStore

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="requests per run")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="pcee-batcher-bench-"))
    bundle = ModelBundle.load(build_default_bundle(tmp / "bundle"))
    served = ServedModel("1", bundle.runner(), tuple(bundle.meta["input_shape"]), "pcee", 0.5, bundle.policy.num_exits_,
                         target_accuracy=None, bundle_dir=tmp / "bundle")
    x = load_dataset("digits", seed=0).test.x.astype(np.float32)

    p50 = {False: [], True: []}
    for rep in range(args.reps):
        for log_on in (False, True):
            store = TrafficStore(f"sqlite:///{tmp / f'traffic-{rep}.db'}") if log_on else None
            p50[log_on].append(float(np.median(asyncio.run(_round_trips_ms(served, x, store, args.n)))))
            if store is not None:
                store.dispose()
    off, on = statistics.median(p50[False]), statistics.median(p50[True])
    print(f"micro-batcher round trip, one sample per request, {args.n} requests, median of {args.reps} run(s)")
    print(f"{'logging':<8} {'p50 ms':>8}")
    print(f"{'off':<8} {off:>8.3f}")
    print(f"{'on':<8} {on:>8.3f}")
    print(f"logging adds {on - off:+.3f} ms per request inside the service ({100 * (on - off) / off:+.1f}% of the bare round trip)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Adaptive micro-batching (issue 14): a lone request is dispatched at once, not after ``max_wait_ms``;
requests that are queued, or whose clients were just answered, still share a batch."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pcee.inference.runner import ExitResult
from pcee.serving.batcher import MicroBatcher
from pcee.serving.metrics import ServiceMetrics
from pcee.serving.model_source import ServedModel

SHAPE = (1, 4, 4)


class FakeRunner:
    """Answers a sample with (sum of its pixels) mod 10 at exit 0 and records each run's batch size
    (when the run starts). After :meth:`hold`, a run waits for a permit (:meth:`allow`)."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self._permits: threading.Semaphore | None = None

    def hold(self) -> None:
        self._permits = threading.Semaphore(0)

    def allow(self, runs: int = 1) -> None:
        assert self._permits is not None
        self._permits.release(runs)

    def release(self) -> None:
        permits, self._permits = self._permits, None
        if permits is not None:
            permits.release(1000)

    def run(self, x: np.ndarray) -> ExitResult:
        self.batches.append(len(x))
        permits = self._permits
        assert permits is None or permits.acquire(timeout=30), "run never allowed"
        n = len(x)
        conf = np.full((n, 2), np.nan)
        conf[:, 0] = 0.9
        return ExitResult(
            prediction=np.rint(x.reshape(n, -1).sum(1)).astype(np.int64) % 10,
            exit=np.zeros(n, dtype=np.int64),
            confidence=np.full(n, 0.9),
            expected_accuracy=np.full(n, 0.95),
            flops=np.full(n, 100.0),
            confidences=conf,
        )


def served(runner: Any) -> ServedModel:
    return ServedModel("1", runner, SHAPE, "fake", 0.5, 2, target_accuracy=None, bundle_dir=Path("."))


def sample(i: int) -> np.ndarray:
    return np.full((1, *SHAPE), i / 16, dtype=np.float32)  # pixel sum i: the answer is i % 10


async def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def run_with(batcher: MicroBatcher, coro_fn) -> Any:
    async def main() -> Any:
        batcher.start()
        try:
            await batcher.submit(sample(0))  # warm-up: the worker imports torch when it starts
            return await coro_fn()
        finally:
            await asyncio.to_thread(batcher.stop)

    return asyncio.run(main())


def test_lone_request_is_dispatched_without_waiting_max_wait():
    runner = FakeRunner()
    batcher = MicroBatcher(lambda: served(runner), None, ServiceMetrics(), max_wait_ms=200.0)

    async def lone_requests() -> list[float]:
        took = []
        for i in range(5):
            t0 = time.perf_counter()
            answer = await batcher.submit(sample(i))
            took.append(time.perf_counter() - t0)
            assert answer[0]["prediction"] == i % 10
        return took

    took = run_with(batcher, lone_requests)
    assert max(took) < 0.1, f"a lone request waited: {[f'{t * 1000:.0f} ms' for t in took]} (max_wait 200 ms)"
    assert runner.batches == [1] * 6


def test_queued_requests_share_one_batch():
    runner = FakeRunner()
    batcher = MicroBatcher(lambda: served(runner), None, ServiceMetrics(), max_wait_ms=200.0)

    async def queued() -> list[list[dict]]:
        runner.hold()
        first = asyncio.create_task(batcher.submit(sample(1)))
        await wait_until(lambda: len(runner.batches) == 2)  # the first one is in the model (held)
        rest = [asyncio.create_task(batcher.submit(sample(i))) for i in range(2, 8)]
        await asyncio.sleep(0.05)  # all six queued behind it
        runner.release()
        return await asyncio.gather(first, *rest)

    answers = run_with(batcher, queued)
    assert [a[0]["prediction"] for a in answers] == list(range(1, 8))  # each its own answer
    assert runner.batches == [1, 1, 6]  # warm-up, the held one, then the six queued ones together


def test_answered_clients_coming_back_are_batched_together():
    """Four closed-loop clients that come back 0-20 ms after their answer: the batcher waits for the
    ones still expected (fewer in flight than at the last dispatch), so a round is one batch."""
    runner = FakeRunner()
    batcher = MicroBatcher(lambda: served(runner), None, ServiceMetrics(), max_wait_ms=200.0)
    rng = random.Random(0)

    async def clients() -> None:
        async def client(k: int) -> None:
            for i in range(6):
                answer = await batcher.submit(sample(10 * k + i))
                assert answer[0]["prediction"] == (10 * k + i) % 10
                await asyncio.sleep(rng.uniform(0.0, 0.02))

        await asyncio.gather(*(client(k) for k in range(4)))

    run_with(batcher, clients)
    runs = runner.batches[1:]  # after the warm-up
    assert sum(runs) == 24 and max(runs) == 4
    assert len(runs) <= 10, f"the clients were not batched together: batch sizes {runs}"

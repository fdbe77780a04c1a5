"""Load generator: real HTTP requests from C concurrent clients (httpx, asyncio), labels posted to
``/feedback`` for a fraction of the answers, and a summary (latency percentiles, throughput,
accuracy on answered labelled requests, exit histogram)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np


@dataclass
class LoadResult:
    """What a load run saw. ``answered`` maps request id -> (prediction, exit, label)."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    correct: int = 0
    exits: Counter = field(default_factory=Counter)
    feedback_sent: int = 0
    feedback_errors: int = 0
    request_ids: list[str] = field(default_factory=list)
    answered: int = 0  # answered as a confident prediction (not abstained, deferred or failed over)
    answered_correct: int = 0
    declined: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # abstained / deferred / deferral_failed
    flops_total: float = 0.0
    exit_flops: dict[int, float] = field(default_factory=dict)  # FLOPs the service reports per exit
    model_versions: Counter = field(default_factory=Counter)

    def add_error(self, kind: str) -> None:
        """A request that got no answer: a transport error's class name, or ``HTTP <status>``."""
        self.errors += 1
        self.error_kinds[kind] += 1

    def add_answer(self, out: dict[str, Any], label: int | None, latency_s: float, keep_id: bool = False) -> None:
        """A 200 answer ``out`` of /predict, with the sample's true ``label`` when known."""
        self.ok += 1
        self.latencies_s.append(latency_s)
        self.exits[int(out["exit"])] += 1
        self.model_versions[str(out.get("model_version"))] += 1
        self.flops_total += float(out.get("flops", 0.0))
        self.exit_flops[int(out["exit"])] = float(out.get("flops", 0.0))
        answered = bool(out.get("answered", True))
        self.answered += answered
        if not answered:
            kind = (
                "deferred" if out.get("deferred") else "deferral_failed" if out.get("deferral_failed") else "abstained"
            )
            self.declined[kind] += 1
        if keep_id:
            self.request_ids.append(out["request_id"])
        if label is not None:
            self.correct += int(out["prediction"] == label)
            self.answered_correct += int(answered and out["prediction"] == label)

    @property
    def accuracy(self) -> float:
        return self.correct / self.ok if self.ok else float("nan")

    @property
    def answered_accuracy(self) -> float:
        """Accuracy on answered requests (needs labels)."""
        return self.answered_correct / self.answered if self.answered else float("nan")

    @property
    def coverage(self) -> float:
        return self.answered / self.ok if self.ok else float("nan")

    def relative_cost(self, num_exits: int) -> float:
        """Mean FLOPs over the final exit's FLOPs (NaN when no request reached the final exit)."""
        final = self.exit_flops.get(num_exits - 1)
        return self.flops_total / self.ok / final if self.ok and final else float("nan")

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else float("nan")

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000.0) if self.latencies_s else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "p50_ms": round(self.percentile_ms(50), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "req_per_s": round(self.throughput, 1),
            "accuracy": round(self.accuracy, 4),
            "coverage": round(self.coverage, 4),
            "answered_accuracy": round(self.answered_accuracy, 4),
            "declined": dict(self.declined),
            "feedback_sent": self.feedback_sent,
            "feedback_errors": self.feedback_errors,
            "exit_histogram": dict(sorted(self.exits.items())),
            "model_versions": dict(self.model_versions),
            "error_kinds": dict(self.error_kinds),
        }

    def format(self) -> str:
        s = self.summary()
        lines = [
            f"requests {s['requests']}  ok {s['ok']}  errors {s['errors']}  ({self.wall_s:.2f} s)",
            f"latency p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  throughput {s['req_per_s']:.1f} req/s",
            f"accuracy on answered requests {s['accuracy']:.4f}  feedback posted {s['feedback_sent']} (errors {s['feedback_errors']})",
            "exit histogram: " + "  ".join(f"exit {k}: {v}" for k, v in s["exit_histogram"].items()),
            "model versions: " + "  ".join(f"{k}: {v}" for k, v in s["model_versions"].items()),
        ]
        if s["error_kinds"]:
            lines.append("errors: " + "  ".join(f"{k}: {v}" for k, v in s["error_kinds"].items()))
        return "\n".join(lines)


async def _post_feedback(client: httpx.AsyncClient, base: str, body: dict, headers: dict[str, str]) -> bool:
    """POST one label; a 429 is retried after its Retry-After (at most 3 times). Returns whether it got a 200."""
    for _ in range(4):
        try:
            r = await client.post(f"{base}/feedback", json=body, headers=headers)
        except httpx.HTTPError:
            return False
        if r.status_code != 429:
            return r.status_code == 200
        try:
            wait = float(r.headers.get("retry-after", "1"))
        except ValueError:
            wait = 1.0
        await asyncio.sleep(min(max(wait, 0.0), 5.0))
    return False


async def closed_loop(n: int, concurrency: int, step: Callable[[int], Awaitable[bool | None]]) -> float:
    """Run ``step(i)`` for ``i`` in ``range(n)`` from ``concurrency`` closed-loop clients (each takes
    the next index as soon as its last request is done); a step returning False stops its client.
    Returns the wall time in seconds. The load loop of ``pcee traffic`` and of the benchmarks."""
    counter = iter(range(n))  # shared: the clients take the next index as they free up

    async def client() -> None:
        for i in counter:
            if await step(i) is False:
                return

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - t0


async def run_load(
    url: str | Sequence[str],
    x: np.ndarray,
    y: np.ndarray | None,
    n: int,
    concurrency: int = 8,
    feedback_rate: float = 0.0,
    seed: int = 0,
    timeout_s: float = 30.0,
    keep_ids: bool = False,
    max_errors: int | None = None,
    token: str | None = None,
) -> LoadResult:
    """Send ``n`` single-sample predictions drawn in order (cycling) from ``x`` (N, C, H, W), with
    ``concurrency`` clients; post the true label of a ``feedback_rate`` fraction of answers.
    ``url``: one service (e.g. the load balancer's address), or several (request ``i`` goes to ``url[i % len(url)]``).
    With ``max_errors``, clients stop once that many requests failed (e.g. the server died).
    ``token``: sent as ``Authorization: Bearer`` (the service's ``PCEE_SERVE_TOKEN``); a feedback
    refused by the rate limit (429) is sent again after its ``Retry-After``, up to 3 times."""
    _check_load(n, concurrency, feedback_rate, y)
    rng = random.Random(seed)
    # pre-serialise: the generator should measure the server, not json.dumps
    bodies = [f'{{"inputs": {np.round(xi, 6).tolist()}}}'.encode() for xi in x[: min(len(x), n)]]
    give_feedback = [rng.random() < feedback_rate for _ in range(n)]
    res = LoadResult()
    bases = [u.rstrip("/") for u in ([url] if isinstance(url, str) else url)]
    if not bases:
        raise ValueError("run_load needs at least one service URL")
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    auth = {"Authorization": f"Bearer {token}"} if token else {}

    async def step(client: httpx.AsyncClient, i: int) -> bool:
        if max_errors is not None and res.errors >= max_errors:
            return False
        base = bases[i % len(bases)]
        k = i % len(bodies)
        t0 = time.perf_counter()
        res.sent += 1
        try:
            r = await client.post(
                f"{base}/predict", content=bodies[k], headers={"content-type": "application/json", **auth}
            )
        except httpx.HTTPError as err:
            res.add_error(type(err).__name__)
            return True
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            res.add_error(f"HTTP {r.status_code}")
            return True
        out = r.json()
        res.add_answer(out, None if y is None else int(y[k]), dt, keep_id=keep_ids)
        if y is not None and give_feedback[i]:
            ok = await _post_feedback(client, base, {"request_id": out["request_id"], "label": int(y[k])}, auth)
            res.feedback_sent += 1
            res.feedback_errors += int(not ok)
        return True

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        res.wall_s = await closed_loop(n, concurrency, lambda i: step(client, i))
    return res


def _check_load(n: int, concurrency: int, feedback_rate: float, y: np.ndarray | None) -> None:
    """A clear error for a load that cannot run: negative count, no client, a rate outside [0, 1], feedback without labels."""
    if n < 0 or concurrency < 1:
        raise ValueError(f"n must be >= 0 and concurrency >= 1 (got n={n}, concurrency={concurrency})")
    if not 0.0 <= feedback_rate <= 1.0:
        raise ValueError(f"feedback_rate must be in [0, 1], got {feedback_rate}")
    if feedback_rate > 0 and y is None:
        raise ValueError("feedback needs labels")

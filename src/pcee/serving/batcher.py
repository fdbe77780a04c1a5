"""Micro-batching: concurrent requests become one ``EarlyExitRunner.run`` call and one commit.

Request handlers (asyncio) put their samples on a thread-safe queue and await a future; one
worker thread takes what is queued (up to ``max_batch`` samples, waiting at most ``max_wait_ms``
after the first), runs the runner once, writes every row in one transaction, and only then
resolves the futures. So a 200 is never sent for a row that is not committed, and the fsync of a
durable commit is paid once per batch instead of once per request (group commit). A plain
``queue.Queue`` is the hand-off because the consumer is a thread, not a coroutine.

Selective answering: every sample gets a decision from the served answer rule ρ and the answer
mode (:func:`pcee.inference.runner.answer_columns`); the best guess stays in the answer whatever the
decision. A deferred sample is only *marked* here: the request handler forwards it (async) after the
row is committed. Shadow runs: a ``shadow_fraction`` sample of requests also runs to the final
exit (one extra full pass over that subset only), which records ``final_prediction`` and every
exit's confidence, and always stores the input (the label-free refit's data).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pcee.selective import DEFAULT_ANSWER_MODE, check_answer_mode
from pcee.serving.inputs import InputError
from pcee.serving.metrics import ServiceMetrics
from pcee.serving.model_source import ServedModel
from pcee.traffic.store import RequestRecord, TrafficStore, new_request_id

log = logging.getLogger("pcee.serving")

_STOP = object()


@dataclass
class _Item:
    x: np.ndarray  # (n, C, H, W) float32
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    t_enqueue: float


class MicroBatcher:
    """One worker thread that batches, runs the model, logs, and answers.

    Parameters
    ----------
    get_model : returns the model to use for the next batch (hot reload swaps it).
    store : the traffic store; None turns logging off (only for measuring its cost).
    max_batch : most samples per runner call.
    max_wait_ms : longest wait for more requests after the first one of a batch.
    store_fraction : fraction of samples whose input is stored (for recalibration).
    answer_mode : ``answer`` / ``abstain`` / ``defer`` (pcee.selective) with the model's ρ.
    shadow_fraction : fraction of samples also run to the final exit (input always stored).
    """

    def __init__(
        self,
        get_model: Callable[[], ServedModel],
        store: TrafficStore | None,
        metrics: ServiceMetrics,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        store_fraction: float = 0.1,
        seed: int | None = None,
        answer_mode: str = DEFAULT_ANSWER_MODE,
        shadow_fraction: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if not 0.0 <= store_fraction <= 1.0:
            raise ValueError(f"store_fraction must be in [0, 1], got {store_fraction}")
        if not 0.0 <= shadow_fraction <= 1.0:
            raise ValueError(f"shadow_fraction must be in [0, 1], got {shadow_fraction}")
        self.answer_mode = check_answer_mode(answer_mode)
        self.shadow_fraction = shadow_fraction
        self.get_model = get_model
        self.store = store
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.store_fraction = store_fraction
        self._rng = random.Random(seed)
        # its own stream, so switching shadow runs on does not change which inputs are stored
        self._shadow_rng = random.Random(None if seed is None else seed + 1_000_003)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="pcee-batcher", daemon=True)
        self._pending: _Item | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    async def submit(self, x: np.ndarray) -> list[dict[str, Any]]:
        """Answer samples ``x`` (n, C, H, W): one result dict per sample, logged before returning."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put(_Item(x, loop, fut, time.perf_counter()))
        return await fut

    # -- worker thread --------------------------------------------------------------------------
    def _collect(self) -> list[_Item] | None:
        first = self._pending or self._queue.get()
        self._pending = None
        if first is _STOP:
            return None
        items, n = [first], len(first.x)
        deadline = time.perf_counter() + self.max_wait_s
        while n < self.max_batch:
            timeout = deadline - time.perf_counter()
            try:
                item = self._queue.get_nowait() if timeout <= 0 else self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)
                break
            if n + len(item.x) > self.max_batch:
                self._pending = item  # starts the next batch
                break
            items.append(item)
            n += len(item.x)
        return items

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(1)  # a tiny batch gains nothing from intra-op threads; they fight uvicorn
        while True:
            items = self._collect()
            if items is None:
                return
            try:
                self._run_batch(items)
            except Exception as err:  # never let the worker die: fail this batch, keep serving
                log.exception("batch of %d request(s) failed", len(items))
                for it in items:
                    _resolve(it, exc=err)

    def _run_batch(self, items: list[_Item]) -> None:
        model = self.get_model()
        ok = []
        for it in items:
            if it.x.shape[1:] != model.input_shape:  # the model changed shape under a hot reload
                _resolve(it, exc=InputError(422, f"wrong shape {list(it.x.shape[1:])}: model {model.version} expects {list(model.input_shape)}"))
            else:
                ok.append(it)
        if not ok:
            return
        x = np.concatenate([it.x for it in ok]) if len(ok) > 1 else ok[0].x
        res = model.runner.run(x)
        rho = float(model.answer_rule.threshold)
        cols = res.answer_columns(rho, self.answer_mode)
        shadow = np.array([self._shadow_rng.random() < self.shadow_fraction for _ in range(len(x))], dtype=bool)
        full = model.runner.run_all_exits(x[shadow]) if shadow.any() else None  # only the shadow subset pays
        shadow_at = np.cumsum(shadow) - 1  # row of sample i in ``full``
        now = datetime.now(UTC)
        t_done = time.perf_counter()
        results: list[list[dict[str, Any]]] = []
        records: list[RequestRecord] = []
        latencies: list[float] = []
        i = 0
        for it in ok:
            latency_ms = (t_done - it.t_enqueue) * 1000.0
            answers = []
            for j in range(len(it.x)):
                rid = new_request_id()
                confs = np.asarray(res.confidences[i])
                is_shadow = bool(shadow[i])
                store_input = self.store is not None and (self._rng.random() < self.store_fraction or is_shadow)
                rec = RequestRecord(
                    id=rid,
                    time=now,
                    model_version=model.version,
                    delta=model.delta,
                    policy=model.policy_name,
                    exit=int(res.exit[i]),
                    prediction=int(res.prediction[i]),
                    confidence=float(res.confidence[i]),
                    expected_accuracy=float(res.expected_accuracy[i]),
                    confidences=[None if not np.isfinite(c) else float(c) for c in confs],
                    flops=float(res.flops[i]),
                    latency_ms=latency_ms,
                    input=it.x[j] if store_input else None,
                    decision=str(cols["decision"][i]),
                    answer_threshold=rho,
                    shadow=is_shadow,
                    final_prediction=int(full.final_prediction[shadow_at[i]]) if full is not None and is_shadow else None,
                    shadow_confidences=full.confidences[shadow_at[i]].tolist() if full is not None and is_shadow else None,
                )
                records.append(rec)
                answers.append(
                    {
                        "request_id": rid,
                        "prediction": rec.prediction,
                        "exit": rec.exit,
                        "confidence": rec.confidence,
                        "expected_accuracy": rec.expected_accuracy,
                        "flops": rec.flops,
                        "model_version": model.version,
                        "delta": model.delta,
                        "answered": bool(cols["answered"][i]),
                        "abstained": bool(cols["abstained"][i]),
                        "deferred": bool(cols["deferred"][i]),  # the handler forwards these
                        "deferral_failed": False,
                        "answer_threshold": rho,
                        "answer_mode": self.answer_mode,
                        "shadow": is_shadow,
                    }
                )
                latencies.append(latency_ms / 1000.0)
                i += 1
            results.append(answers)
        commit_s = None
        if self.store is not None:
            t_commit = time.perf_counter()
            self.store.log_requests(records)  # commits; raises -> the whole batch fails, no 200
            commit_s = time.perf_counter() - t_commit
        self.metrics.batch(len(x), [r.exit for r in records], latencies, commit_s)
        self.metrics.decided(
            [r.decision for r in records if r.decision != "deferred"],  # counted when the forward ends
            [r.decision == "answered" for r in records],
            [r.expected_accuracy for r in records],
        )
        if full is not None:
            self.metrics.shadow(len(full), int((full.final_prediction == res.prediction[shadow]).sum()))
        for it, answers in zip(ok, results, strict=True):
            _resolve(it, result=answers)


def _resolve(item: _Item, result: Any = None, exc: BaseException | None = None) -> None:
    def _set() -> None:
        if item.future.done():  # the client went away and the handler was cancelled
            return
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)

    item.loop.call_soon_threadsafe(_set)

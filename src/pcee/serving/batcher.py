"""Micro-batching: concurrent requests become one ``EarlyExitRunner.run`` call, and their rows one commit.

Request handlers (asyncio) put their samples on a thread-safe queue and await a future. The *batch
worker* thread takes what is queued (up to ``max_batch`` samples), runs the runner once, builds the
answers and the rows, logs the rows and only then resolves the futures, so a 200 is never sent for
a row that is not logged (a ``kill -9`` loses no answered request). With the SQLite store's default
journal a log call is one ``write()`` (:mod:`pcee.traffic.store`) and the worker makes it itself.
When a log call is dear (an fsync per append with ``synchronous=FULL``, or a commit per call:
PostgreSQL, or SQLite without the journal) the worker hands the batch to the *writer* thread, which
logs it together with every batch that finished while its previous call ran (group commit), so the
call overlaps the model run of the next batch and its cost is shared by every request in it; when
the writer is idle and no request is waiting, the worker logs the batch itself (a hand-off would
only add latency to a lone request). A failed log call fails the requests of that call (503) and
the service goes on.

Adaptive batching: the worker waits for more requests (at most ``max_wait_ms`` after the first one
of a batch) only while more are expected, that is while fewer requests are in flight (submitted
and not yet answered, anywhere in the pipeline) than at the peak since the last dispatch: clients
that were answered are coming back. A lone request (concurrency 1) is dispatched at once, and at
high concurrency the clients answered together are batched together again. Whatever is already
queued is always taken without waiting. A plain ``queue.Queue`` is the hand-off because the
consumers are threads, not coroutines.

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
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from pcee.selective import DEFAULT_ANSWER_MODE, check_answer_mode
from pcee.serving.inputs import InputError
from pcee.serving.metrics import ServiceMetrics
from pcee.serving.model_source import ServedModel
from pcee.traffic.store import RequestRecord, TrafficStore, new_request_id

if TYPE_CHECKING:
    from pcee.inference.answers import AllExits, ExitResult

log = logging.getLogger("pcee.serving")

_STOP = object()

#: how long the batcher remembers the concurrency it saw (the peak of requests in flight): after
#: concurrency drops to a lone client, its requests may wait (at most ``max_wait_ms``) for this long
CONCURRENCY_WINDOW_S = 0.1


@dataclass
class _Item:
    x: np.ndarray  # (n, C, H, W) float32
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    t_enqueue: float
    resolved: bool = False  # only the thread that holds the item touches this


@dataclass
class _Batch:
    """A micro-batch the model has answered: its rows wait to be committed, its answers to be sent."""

    items: list[_Item]
    answers: list[list[dict[str, Any]]]  # per item
    records: list[RequestRecord]  # per sample, in item order
    shadow_runs: int = 0
    shadow_agree: int = 0


@dataclass(frozen=True)
class _Columns:
    """A batch's per-sample answers as Python values: one numpy call per column, not per sample."""

    exits: list[int]
    predictions: list[int]
    confidence: list[float]
    expected: list[float]
    flops: list[float]
    confidences: list[list[float | None]]  # every exit's, None where not finite
    decision: list[str]
    answered: list[bool]
    abstained: list[bool]
    deferred: list[bool]
    shadow: list[bool]
    full: AllExits | None  # the shadow subset run to the final exit
    shadow_at: np.ndarray  # row of sample i in ``full``

    @classmethod
    def of(cls, res: ExitResult, cols: dict[str, np.ndarray], shadow: np.ndarray, full: AllExits | None) -> _Columns:
        confidences = [[c if math.isfinite(c) else None for c in row] for row in np.asarray(res.confidences).tolist()]
        return cls(
            exits=res.exit.tolist(),
            predictions=res.prediction.tolist(),
            confidence=res.confidence.tolist(),
            expected=res.expected_accuracy.tolist(),
            flops=res.flops.tolist(),
            confidences=confidences,
            decision=cols["decision"].tolist(),
            answered=cols["answered"].tolist(),
            abstained=cols["abstained"].tolist(),
            deferred=cols["deferred"].tolist(),
            shadow=shadow.tolist(),
            full=full,
            shadow_at=np.cumsum(shadow) - 1,
        )


class MicroBatcher:
    """A batch worker thread that batches and runs the model, and a writer thread that logs and answers.

    Parameters
    ----------
    get_model : returns the model to use for the next batch (hot reload swaps it).
    store : the traffic store; None turns logging off (only for measuring its cost).
    max_batch : most samples per runner call.
    max_wait_ms : longest wait for more requests after the first one of a batch, spent only while
        more requests are expected (see the module docstring); 0 never waits.
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
        # requests submitted and not yet answered, and their peak in the current and the last window
        self._count_lock = threading.Lock()
        self._in_flight = 0
        self._peak = 0
        self._last_peak = 0
        self._window_end = 0.0
        # batches handed to the writer and not yet committed (only the worker adds to it)
        self._commits: queue.Queue = queue.Queue()
        self._writer_backlog = 0
        self._writer = threading.Thread(target=self._write_loop, name="pcee-batch-writer", daemon=True)
        # a cheap log call costs less than handing it to the writer thread: the worker makes it itself
        self.log_inline = store is not None and store.log_is_cheap

    def start(self) -> None:
        self._writer.start()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Answer what was submitted (model run, rows committed), then stop both threads."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._commits.put(_STOP)
        self._writer.join(timeout)

    @property
    def commit_backlog(self) -> int:
        """Batches handed to the writer whose rows are not committed yet."""
        return self._writer_backlog

    async def submit(self, x: np.ndarray) -> list[dict[str, Any]]:
        """Answer samples ``x`` (n, C, H, W): one result dict per sample, returned once its row is committed."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._count_lock:
            self._in_flight += 1
            if self._in_flight > self._peak:
                self._peak = self._in_flight
        self._queue.put(_Item(x, loop, fut, time.perf_counter()))
        return await fut

    # -- batch worker thread --------------------------------------------------------------------
    def _more_expected(self) -> bool:
        """Whether more requests are coming: fewer are in flight than the recent concurrency (the
        peak of the in-flight count over the last :data:`CONCURRENCY_WINDOW_S` or so), so answered
        clients, or requests still being read, are about to arrive."""
        with self._count_lock:
            return self._in_flight < max(self._peak, self._last_peak)

    def _dispatched(self) -> None:
        """A batch leaves: roll the concurrency window when it is over."""
        now = time.perf_counter()
        with self._count_lock:
            if now >= self._window_end:
                self._last_peak, self._peak = self._peak, self._in_flight
                self._window_end = now + CONCURRENCY_WINDOW_S

    def _collect(self) -> list[_Item] | None:
        first = self._pending or self._queue.get()
        self._pending = None
        if first is _STOP:
            return None
        items, n = [first], len(first.x)
        deadline = time.perf_counter() + self.max_wait_s
        while n < self.max_batch:
            try:
                item = self._queue.get_nowait()  # what is already there is always taken
            except queue.Empty:
                # no idle waiting: wait only while answered clients may come back (never for a lone
                # client); the count can only reach the peak by a submit, which also wakes this get
                timeout = deadline - time.perf_counter()
                if timeout <= 0 or not self._more_expected():
                    break
                try:
                    item = self._queue.get(timeout=timeout)
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
        self._dispatched()
        return items

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(1)  # a tiny batch gains nothing from intra-op threads; they fight uvicorn
        while True:
            items = self._collect()
            if items is None:
                return
            try:
                batch = self._run_batch(items)
                if batch is None:
                    continue
                if self.store is None:
                    self._answer([batch], None)
                elif self.log_inline or (self._writer_backlog == 0 and self._queue.empty()):
                    self._commit([batch])  # cheap, or nothing could overlap with it: no hand-off
                else:
                    with self._count_lock:
                        self._writer_backlog += 1
                    self._commits.put(batch)
            except Exception as err:  # never let the worker die: fail this batch, keep serving
                log.exception("batch of %d request(s) failed", len(items))
                for it in items:
                    self._resolve(it, exc=err)  # those already answered are left alone

    def _run_batch(self, items: list[_Item]) -> _Batch | None:
        """Run the model once over the items that fit it; their answers and rows, or None when none fit."""
        model = self.get_model()
        ok = self._fitting(items, model)
        if not ok:
            return None
        x = np.concatenate([it.x for it in ok]) if len(ok) > 1 else ok[0].x
        res = model.runner.run(x)
        cols = res.answer_columns(model.answer_rule.serving_threshold, self.answer_mode)  # unverified: declines all
        shadow = np.array([self._shadow_rng.random() < self.shadow_fraction for _ in range(len(x))], dtype=bool)
        full = model.runner.run_all_exits(x[shadow]) if shadow.any() else None  # only the shadow subset pays
        now = datetime.now(UTC)
        t_done = time.perf_counter()
        batch = self._answers_and_records(ok, model, _Columns.of(res, cols, shadow, full), now, t_done)
        if full is not None:
            batch.shadow_runs = len(full)
            batch.shadow_agree = int((full.final_prediction == res.prediction[shadow]).sum())
        return batch

    def _fitting(self, items: list[_Item], model: ServedModel) -> list[_Item]:
        """The items whose samples fit the model's input shape; the others are failed with a 422."""
        ok = []
        for it in items:
            if it.x.shape[1:] != model.input_shape:  # the model changed shape under a hot reload
                self._resolve(
                    it,
                    exc=InputError(
                        422,
                        f"wrong shape {list(it.x.shape[1:])}: model {model.version} expects {list(model.input_shape)}",
                    ),
                )
            else:
                ok.append(it)
        return ok

    def _answers_and_records(
        self, items: list[_Item], model: ServedModel, cols: _Columns, now: datetime, t_done: float
    ) -> _Batch:
        """One answer and one row per sample, sample ``i`` of the batch being row ``i`` of ``cols``."""
        rho = float(model.answer_rule.threshold)
        checked = {True: model.verification.response_status(True), False: model.verification.response_status(False)}
        results: list[list[dict[str, Any]]] = []
        records: list[RequestRecord] = []
        i = 0
        for it in items:
            latency_ms = (t_done - it.t_enqueue) * 1000.0
            answers = []
            for j in range(len(it.x)):
                rec = self._record(model, cols, i, it.x[j], latency_ms, now, rho)
                records.append(rec)
                answers.append(
                    {
                        "request_id": rec.id,
                        "prediction": rec.prediction,
                        "exit": rec.exit,
                        "confidence": rec.confidence,
                        "expected_accuracy": rec.expected_accuracy,
                        "flops": rec.flops,
                        "model_version": model.version,
                        "delta": model.delta,
                        "answered": bool(cols.answered[i]),
                        "abstained": bool(cols.abstained[i]),
                        "deferred": bool(cols.deferred[i]),  # the handler forwards these
                        "deferral_failed": False,
                        "answer_threshold": rho,
                        "answer_mode": self.answer_mode,
                        "shadow": rec.shadow,
                        "verification": checked[bool(cols.answered[i])],
                    }
                )
                i += 1
            results.append(answers)
        return _Batch(items, results, records)

    def _record(
        self, model: ServedModel, cols: _Columns, i: int, x: np.ndarray, latency_ms: float, now: datetime, rho: float
    ) -> RequestRecord:
        """The logged row of sample ``i`` (input ``x``); its input is kept for a sampled few and every shadow run."""
        rid = new_request_id()
        is_shadow = bool(cols.shadow[i])
        store_input = self.store is not None and (self._rng.random() < self.store_fraction or is_shadow)
        return RequestRecord(
            id=rid,
            time=now,
            model_version=model.version,
            delta=model.delta,
            policy=model.policy_name,
            exit=int(cols.exits[i]),
            prediction=int(cols.predictions[i]),
            confidence=float(cols.confidence[i]),
            expected_accuracy=float(cols.expected[i]),
            confidences=cols.confidences[i],
            flops=float(cols.flops[i]),
            latency_ms=latency_ms,
            input=x if store_input else None,
            decision=str(cols.decision[i]),
            answer_threshold=rho,
            shadow=is_shadow,
            final_prediction=int(cols.full.final_prediction[cols.shadow_at[i]])
            if cols.full is not None and is_shadow
            else None,
            shadow_confidences=cols.full.confidences[cols.shadow_at[i]].tolist()
            if cols.full is not None and is_shadow
            else None,
            num_classes=model.num_classes or None,
        )

    # -- commit and answer (writer thread, or the worker when the writer is idle) ---------------
    def _write_loop(self) -> None:
        while True:
            first = self._commits.get()
            if first is _STOP:
                return
            group, stop = [first], False
            while True:  # every batch that finished while the last commit ran: one transaction
                try:
                    more = self._commits.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                group.append(more)
            try:
                self._commit(group)
            except Exception as err:  # never let the writer die, nor leave a request unanswered
                log.exception("answering %d batch(es) failed", len(group))
                for b in group:
                    for it in b.items:
                        self._resolve(it, exc=err)  # those already answered are left alone
            finally:
                with self._count_lock:
                    self._writer_backlog -= len(group)
            if stop:
                return

    def _commit(self, group: list[_Batch]) -> None:
        """Log the rows of ``group`` in one call, then answer its requests; a failed call fails them."""
        assert self.store is not None
        records = [r for b in group for r in b.records]
        t0 = time.perf_counter()
        try:
            self.store.log_requests(records)  # durable on return (appended or committed)
        except Exception as err:
            log.exception("commit of %d row(s) failed: their %d request(s) get a 503", len(records), _n_items(group))
            for b in group:
                for it in b.items:
                    self._resolve(it, exc=_store_error(err))
            return
        self._answer(group, time.perf_counter() - t0)

    def _answer(self, group: list[_Batch], commit_s: float | None) -> None:
        """Count the committed batches in the metrics (before any answer, so a scrape after an answer
        sees it), then answer their requests."""
        t = time.perf_counter()
        for k, b in enumerate(group):
            recs = b.records
            latencies = [t - it.t_enqueue for it in b.items for _ in range(len(it.x))]  # enqueue -> committed
            self.metrics.batch(len(recs), [r.exit for r in recs], latencies, commit_s if k == 0 else None)
            self.metrics.decided(
                [r.decision for r in recs if r.decision != "deferred"],  # counted when the forward ends
                [r.decision == "answered" for r in recs],
                [r.expected_accuracy for r in recs],
            )
            if b.shadow_runs:
                self.metrics.shadow(b.shadow_runs, b.shadow_agree)
        for b in group:
            for it, answers in zip(b.items, b.answers, strict=True):
                self._resolve(it, result=answers)

    def _resolve(self, item: _Item, result: Any = None, exc: BaseException | None = None) -> None:
        if item.resolved:
            return
        item.resolved = True
        with self._count_lock:
            self._in_flight -= 1
        _resolve(item, result, exc)


def _n_items(group: list[_Batch]) -> int:
    return sum(len(b.items) for b in group)


def _store_error(err: BaseException) -> InputError:
    return InputError(
        503,
        f"the request could not be logged (traffic store: {type(err).__name__}); it was not answered, retry",
        problem="store_unavailable",
    )


def _resolve(item: _Item, result: Any = None, exc: BaseException | None = None) -> None:
    def _set() -> None:
        if item.future.done():  # the client went away and the handler was cancelled
            return
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)

    item.loop.call_soon_threadsafe(_set)

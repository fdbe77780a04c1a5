"""Group commit (issue 14): the rows of a batch, and of the batches that finish while a commit runs,
are written in one transaction; a request is answered only once its row is committed; a failed
commit fails its requests (503, never 200) and the service goes on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

import pytest
from fastapi.testclient import TestClient

from pcee.serving.app import ServeConfig, Service, create_app
from pcee.serving.batcher import MicroBatcher
from pcee.serving.inputs import InputError
from pcee.serving.metrics import ServiceMetrics
from pcee.serving.model_source import LocalBundleSource
from pcee.traffic.store import RequestRecord, TrafficStore

from .test_batcher_adaptive import FakeRunner, sample, served, wait_until


class GatedStore(TrafficStore):
    """A SQLite traffic store whose commits can be held (``gate``) or made to fail (the transactions
    numbered in ``fail_at``, from 0); ``calls`` has the row count of every committed transaction."""

    def __init__(self, url: str, **kw) -> None:
        super().__init__(url, **kw)
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()  # a commit is held at the gate
        self.fail_at: set[int] = set()
        self.attempts = 0
        self.calls: list[int] = []

    def log_requests(self, records: Iterable[RequestRecord]) -> int:
        records = list(records)
        k, self.attempts = self.attempts, self.attempts + 1
        self.waiting.set()
        assert self.gate.wait(30), "gate never opened"
        self.waiting.clear()
        if k in self.fail_at:
            raise OSError("disk I/O error (injected)")
        n = super().log_requests(records)
        self.calls.append(n)
        return n


@pytest.fixture(params=["direct", "journal-fsync"])
def store(request, tmp_path):
    """The stores whose log call is dear, which the batcher hands to its writer thread: a commit per
    call, or the journal fsyncing every append (``FULL``). The default journal is logged inline."""
    url = f"sqlite:///{tmp_path / 'traffic.db'}"
    s = GatedStore(url, journal=False) if request.param == "direct" else GatedStore(url, synchronous="FULL")
    yield s
    s.dispose()


def run_with(batcher: MicroBatcher, coro_fn):
    async def main():
        batcher.start()
        try:
            return await coro_fn()
        finally:
            await asyncio.to_thread(batcher.stop)

    return asyncio.run(main())


def test_rows_of_batches_finished_during_a_commit_go_in_one_transaction_and_answers_wait_for_it(store):
    runner = FakeRunner()
    batcher = MicroBatcher(lambda: served(runner), store, ServiceMetrics(), max_wait_ms=0.0, store_fraction=0.5)
    acked: list[str] = []
    committed_when_acked: list[bool] = []

    async def client(i: int) -> None:
        answer = await batcher.submit(sample(i))
        rid = answer[0]["request_id"]
        assert answer[0]["prediction"] == i % 10
        committed_when_acked.append(store.get_request(rid) is not None)  # read through another connection
        acked.append(rid)

    async def scenario() -> None:
        runner.hold()
        store.gate.clear()
        tasks = [asyncio.create_task(client(0))]
        await wait_until(lambda: len(runner.batches) == 1)  # batch 1 (one request) held in the model
        tasks += [asyncio.create_task(client(i)) for i in range(1, 12)]
        await asyncio.sleep(0.05)  # eleven requests queued behind it
        runner.allow(1)  # batch 1 goes to the writer (requests are waiting), whose commit is held
        await wait_until(store.waiting.is_set)
        runner.release()  # batch 2 (the eleven) runs while that commit is held
        await wait_until(lambda: sum(runner.batches) == 12)
        tasks += [asyncio.create_task(client(i)) for i in range(12, 16)]  # batch 3 (or more)
        await wait_until(lambda: sum(runner.batches) == 16 and batcher.commit_backlog == len(runner.batches))
        await asyncio.sleep(0.1)
        assert acked == [] and not any(t.done() for t in tasks)  # nothing answered before its commit
        assert store.count_requests() == 0
        store.gate.set()
        await asyncio.gather(*tasks)

    run_with(batcher, scenario)
    assert len(acked) == 16 and all(committed_when_acked)
    assert runner.batches[:2] == [1, 11] and len(runner.batches) >= 3
    assert store.calls == [1, 15]  # batch 1 alone, then every batch that finished meanwhile in one transaction
    assert store.count_requests() == 16 and store.request_ids() == set(acked)


def test_lone_request_commits_before_its_answer(store):
    """At concurrency 1 the worker commits itself (no hand-off), still before answering."""
    runner = FakeRunner()
    batcher = MicroBatcher(lambda: served(runner), store, ServiceMetrics(), max_wait_ms=2.0)

    async def scenario() -> None:
        store.gate.clear()
        task = asyncio.create_task(batcher.submit(sample(3)))
        await wait_until(store.waiting.is_set)
        await asyncio.sleep(0.1)
        assert not task.done() and store.count_requests() == 0
        store.gate.set()
        answer = await task
        assert store.get_request(answer[0]["request_id"]) is not None
        for i in range(20):
            answer = await batcher.submit(sample(i))
            assert store.get_request(answer[0]["request_id"]) is not None

    run_with(batcher, scenario)
    assert store.count_requests() == 21 and store.calls == [1] * 21


def test_failed_commit_fails_its_requests_and_the_batcher_goes_on(store):
    runner = FakeRunner()
    batcher = MicroBatcher(lambda: served(runner), store, ServiceMetrics(), max_wait_ms=0.0)

    async def scenario() -> tuple[list, list, list]:
        store.fail_at = {0, 2}
        with pytest.raises(InputError) as err:  # transaction 0: a lone request
            await batcher.submit(sample(1))
        assert err.value.status == 503 and err.value.problem == "store_unavailable"
        # transaction 1 (one batch) commits; transaction 2 (the batches that finished meanwhile) fails whole
        runner.hold()
        store.gate.clear()
        first = asyncio.create_task(batcher.submit(sample(2)))
        await wait_until(lambda: len(runner.batches) == 2)
        rest = [asyncio.create_task(batcher.submit(sample(i))) for i in range(3, 9)]
        await asyncio.sleep(0.05)
        runner.allow(1)
        await wait_until(store.waiting.is_set)
        runner.release()
        rest += [asyncio.create_task(batcher.submit(sample(i))) for i in range(9, 12)]
        await wait_until(lambda: sum(runner.batches) == 11 and batcher.commit_backlog == len(runner.batches) - 1)
        store.gate.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        after = [await batcher.submit(sample(i)) for i in range(3)]  # the batcher goes on
        return results[:1], results[1:], after

    (first,), rest, after = run_with(batcher, scenario)
    assert first[0]["prediction"] == 2
    assert len(rest) == 9 and all(isinstance(r, InputError) and r.status == 503 for r in rest)
    assert [a[0]["prediction"] for a in after] == [0, 1, 2]
    # exactly the answered requests are in the store: a failed transaction wrote nothing
    assert store.request_ids() == {a[0]["request_id"] for a in [first, *after]}
    assert store.calls == [1, 1, 1, 1] and store.attempts == 6


def test_http_answers_503_not_200_when_the_commit_fails_and_recovers(bundle_dir, digits_test, tmp_path):
    store = GatedStore(f"sqlite:///{tmp_path / 'traffic.db'}")  # the default: the journal, logged inline
    service = Service(ServeConfig(poll_interval_s=0, seed=0), LocalBundleSource(bundle_dir), store)
    service.start()
    client = TestClient(create_app(service), raise_server_exceptions=False)
    x, _ = digits_test
    try:
        store.fail_at = {0}
        r = client.post("/predict", json={"inputs": x[0].tolist()})
        assert r.status_code == 503, r.text
        assert "could not be logged" in r.json()["error"]
        assert store.count_requests() == 0
        r = client.post("/predict", json={"inputs": x[1].tolist()})
        assert r.status_code == 200, r.text
        assert store.get_request(r.json()["request_id"]) is not None
        metrics = client.get("/metrics").text
        assert 'pcee_errors_total{problem="store_unavailable"} 1.0' in metrics
        assert 'pcee_http_requests_total{endpoint="/predict",status="503"} 1.0' in metrics
        assert 'pcee_http_requests_total{endpoint="/predict",status="200"} 1.0' in metrics
    finally:
        client.close()
        service.stop()
        store.dispose()


def test_the_default_journal_is_logged_inline_and_a_dear_log_call_by_the_writer(tmp_path):
    url = f"sqlite:///{tmp_path / 'traffic.db'}"
    for kw, inline in (({}, True), ({"synchronous": "FULL"}, False), ({"journal": False}, False)):
        store = TrafficStore(url, **kw)
        assert MicroBatcher(lambda: None, store, ServiceMetrics()).log_inline is inline, kw
        store.dispose()
    assert MicroBatcher(lambda: None, None, ServiceMetrics()).log_inline is False

"""The traffic store's write path (the service's hot path, issue 14): every column of a row as
written, a whole transaction or nothing, and a store that keeps working after a failed commit."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from pcee.traffic.store import RequestRecord, TrafficStore, new_request_id


@pytest.fixture(params=[True, False], ids=["journal", "direct"])
def store(request, tmp_path):
    """Both SQLite write paths: through the journal (the default) and a commit per call."""
    s = TrafficStore(f"sqlite:///{tmp_path / 'traffic.db'}", journal=request.param)
    assert (s.journal is not None) == request.param
    yield s
    s.dispose()


def _rec(i: int, **kw) -> RequestRecord:
    base = {
        "id": new_request_id(),
        "time": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(milliseconds=i),
        "model_version": "3",
        "delta": 0.8,
        "policy": "pcee",
        "exit": 1,
        "prediction": i % 10,
        "confidence": 0.75,
        "expected_accuracy": 0.9,
        "confidences": [0.5, 0.75, float("nan")],
        "flops": 1234.5,
        "latency_ms": 2.5,
    }
    return RequestRecord(**{**base, **kw})


def test_every_column_is_written_where_it_belongs(store, tmp_path):
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    a = _rec(
        1,
        exit=np.int64(2),
        prediction=np.int64(7),
        confidence=np.float32(0.5),
        confidences=np.array([0.25, np.inf, np.nan]),
        input=x,
        decision="abstained",
        answer_threshold=0.6,
        shadow=True,
        final_prediction=4,
        shadow_confidences=[0.25, 0.5, float("nan")],
    )
    b = _rec(2, delta=None, answer_threshold=None, fallback_prediction=5, decision="deferred")
    assert store.log_requests([a, b]) == 2
    other = TrafficStore(f"sqlite:///{tmp_path / 'traffic.db'}")  # read through another engine
    ra, rb = other.get_request(a.id), other.get_request(b.id)
    assert ra is not None and rb is not None
    assert ra["time"].replace(tzinfo=UTC) == a.time
    assert (ra["model_version"], ra["delta"], ra["policy"]) == ("3", 0.8, "pcee")
    assert (ra["exit"], ra["prediction"], ra["confidence"], ra["expected_accuracy"]) == (2, 7, 0.5, 0.9)
    assert ra["confidences"] == [0.25, None, None] and ra["confidence_0"] == 0.25  # non-finite -> null
    assert (ra["flops"], ra["latency_ms"], ra["input_stored"]) == (1234.5, 2.5, 1)
    assert (ra["decision"], ra["answer_threshold"], ra["shadow"]) == ("abstained", 0.6, True)
    assert ra["final_prediction"] == 4 and ra["fallback_prediction"] is None
    assert ra["shadow_confidences"] == [0.25, 0.5, None]
    assert np.array_equal(other.get_input(a.id), x)
    assert rb["delta"] is None and rb["answer_threshold"] is None and rb["input_stored"] == 0
    assert (rb["decision"], rb["fallback_prediction"], rb["shadow"]) == ("deferred", 5, False)
    assert rb["final_prediction"] is None and rb["shadow_confidences"] is None
    assert other.get_input(b.id) is None
    other.dispose()


def test_a_failed_transaction_writes_nothing_and_the_store_goes_on(tmp_path):
    store = TrafficStore(f"sqlite:///{tmp_path / 'traffic.db'}", journal=False)  # a commit per call
    first = _rec(1)
    store.log_requests([first])
    batch = [_rec(2, input=np.zeros((1, 2, 2), np.float32)), _rec(3), first]  # `first` again: duplicate key
    with pytest.raises((sqlite3.IntegrityError, IntegrityError)):
        store.log_requests(batch)
    assert store.request_ids() == {first.id}  # none of the failed transaction's rows
    assert store.get_input(batch[0].id) is None
    later = [_rec(4), _rec(5, input=np.ones((1, 2, 2), np.float32))]
    assert store.log_requests(later) == 2
    assert store.request_ids() == {first.id, *(r.id for r in later)}
    store.dispose()


def test_rows_of_one_call_share_a_transaction_with_their_inputs(store):
    recs = [_rec(i, input=np.full((1, 2, 2), i, np.float32) if i % 3 == 0 else None) for i in range(30)]
    assert store.log_requests(recs) == 30
    assert store.count_requests() == 30
    for r in recs:
        got = store.get_input(r.id)
        assert (got is None) == (r.input is None)
        if r.input is not None:
            assert np.array_equal(got, r.input)
    assert store.log_requests([]) == 0

"""Traffic store: WAL mode, durable rows, idempotent feedback, windows, inputs stored without pickle."""

from __future__ import annotations

import io
import pickle
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from pcee.traffic.store import (
    RequestRecord,
    TrafficStore,
    UnknownRequestError,
    array_from_bytes,
    array_to_bytes,
)
from tests.records import request_record


def _record(i: int, t: datetime, with_input: bool = False, num_exits: int = 3) -> RequestRecord:
    rng = np.random.default_rng(i)
    confs = [float(rng.random())] + [None] * (num_exits - 1)
    return request_record(
        time=t,
        model_version="7",
        prediction=i % 10,
        confidence=confs[0],
        expected_accuracy=0.95,
        confidences=confs,
        flops=1000.0,
        latency_ms=1.5,
        input=rng.random((1, 8, 8)).astype(np.float32) if with_input else None,
    )


@pytest.fixture
def store(tmp_path):
    s = TrafficStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    yield s
    s.dispose()


def test_sqlite_runs_in_wal_mode(store, tmp_path):
    assert store.journal_mode() == "wal"
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar_one() == 1  # NORMAL by default
    full = TrafficStore(f"sqlite:///{tmp_path / 'full.db'}", synchronous="full")
    with full.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2
    assert full.journal_mode() == "wal"
    full.dispose()


def test_bad_synchronous_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="synchronous must be one of"):
        TrafficStore(f"sqlite:///{tmp_path / 'x.db'}", synchronous="sometimes")


def test_rows_are_committed_and_visible_to_a_new_connection(store, tmp_path):
    now = datetime.now(UTC)
    recs = [_record(i, now) for i in range(5)]
    assert store.log_requests(recs) == 5
    other = TrafficStore(f"sqlite:///{tmp_path / 'traffic.db'}")  # a second engine = another process's view
    assert other.request_ids() == {r.id for r in recs}
    row = other.get_request(recs[0].id)
    assert row["confidences"] == [recs[0].confidences[0], None, None]
    assert row["model_version"] == "7" and row["delta"] == 0.9
    other.dispose()


def test_stored_inputs_round_trip_without_pickle(store):
    rec = _record(1, datetime.now(UTC), with_input=True)
    store.log_requests([rec])
    back = store.get_input(rec.id)
    assert back.dtype == np.float32 and np.array_equal(back, rec.input)
    # the blob is a plain .npy, readable with pickle disabled
    assert np.array_equal(array_from_bytes(array_to_bytes(rec.input)), rec.input)


def test_pickled_object_blob_is_refused():
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        array_from_bytes(buf.getvalue())
    assert pickle  # the store never imports pickle to read traffic


def test_feedback_is_idempotent_and_unknown_ids_are_refused(store):
    rec = _record(2, datetime.now(UTC))
    store.log_requests([rec])
    assert store.add_feedback(rec.id, 4) is True
    assert store.add_feedback(rec.id, 4) is False
    assert store.add_feedback(rec.id, 5) is False  # first label wins
    assert store.get_feedback(rec.id) == 4
    assert store.count_feedback() == 1
    with pytest.raises(UnknownRequestError):
        store.add_feedback("no-such-id", 1)


def test_count_and_time_windows(store):
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    recs = [_record(i, t0 + timedelta(seconds=i)) for i in range(10)]
    store.log_requests(recs)
    w = store.recent_confidences(last=4)
    assert w.ids == [r.id for r in recs[-4:]]  # oldest first
    assert w.confidences.shape == (4, 3)
    assert np.allclose(w.confidences[:, 0], [r.confidences[0] for r in recs[-4:]])
    assert np.isnan(w.confidences[:, 1:]).all()
    w2 = store.recent_confidences(since=t0 + timedelta(seconds=2), until=t0 + timedelta(seconds=5))
    assert w2.ids == [r.id for r in recs[2:5]]
    assert w2.times[0] == t0 + timedelta(seconds=2)


def test_labelled_inputs_window(store):
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    recs = [_record(i, t0 + timedelta(seconds=i), with_input=i % 2 == 0) for i in range(8)]
    store.log_requests(recs)
    for r in recs[:6]:
        store.add_feedback(r.id, r.prediction)
    li = store.labelled_inputs()
    assert li.ids == [recs[i].id for i in (0, 2, 4)]  # stored input AND a label
    assert li.x.shape == (3, 1, 8, 8)
    assert li.y.tolist() == [recs[i].prediction for i in (0, 2, 4)]
    assert store.labelled_inputs(since=t0 + timedelta(seconds=1)).ids == [recs[2].id, recs[4].id]
    assert len(store.labelled_inputs(last=1)) == 1

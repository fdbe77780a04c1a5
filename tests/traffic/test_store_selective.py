"""Traffic store and selective answering: the decision columns, the migration of a database created
by the previous schema, deferral outcomes, shadow rows, and the selective window's numbers."""

from __future__ import annotations

import math
import sqlite3
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from pcee.traffic.store import RequestRecord, TrafficStore
from tests.records import request_record

NEW_COLUMNS = [
    "decision",
    "answer_threshold",
    "shadow",
    "final_prediction",
    "fallback_prediction",
    "shadow_confidences",
    "num_classes",
]

# the ``requests`` table exactly as the schema before selective answering created it (SQLite DDL)
OLD_SCHEMA = """
CREATE TABLE requests (
    id VARCHAR(36) NOT NULL, time DATETIME NOT NULL, model_version VARCHAR(64) NOT NULL, delta FLOAT,
    policy VARCHAR(64) NOT NULL, exit INTEGER NOT NULL, prediction INTEGER NOT NULL, confidence FLOAT NOT NULL,
    expected_accuracy FLOAT NOT NULL, confidences TEXT NOT NULL, confidence_0 FLOAT, flops FLOAT NOT NULL,
    latency_ms FLOAT NOT NULL, input_stored INTEGER NOT NULL, PRIMARY KEY (id)
);
CREATE INDEX ix_requests_time ON requests (time);
CREATE INDEX ix_requests_model_version ON requests (model_version);
CREATE TABLE feedback (request_id VARCHAR(36) NOT NULL, label INTEGER NOT NULL, time DATETIME NOT NULL, PRIMARY KEY (request_id));
CREATE TABLE inputs (request_id VARCHAR(36) NOT NULL, array BLOB NOT NULL, PRIMARY KEY (request_id));
INSERT INTO requests VALUES ('old-1', '2026-01-01 00:00:00.000000', '3', 0.9, 'pcee', 1, 4, 0.8, 0.93,
    '[0.5, 0.8, null]', 0.5, 2000.0, 1.2, 0);
INSERT INTO feedback VALUES ('old-1', 4, '2026-01-01 00:00:01.000000');
"""


def _rec(t: datetime, pred: int, e: float, decision: str = "answered", **kw) -> RequestRecord:
    return request_record(
        time=t,
        model_version="7",
        prediction=pred,
        expected_accuracy=e,
        confidences=[0.5, None],
        flops=10.0,
        decision=decision,
        answer_threshold=0.8,
        **kw,
    )


@pytest.fixture
def store(tmp_path):
    s = TrafficStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    yield s
    s.dispose()


def test_old_database_gets_the_new_columns_and_keeps_working(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    store = TrafficStore(f"sqlite:///{path}")
    assert store.added_columns == NEW_COLUMNS
    with sqlite3.connect(path) as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(requests)")]
    assert cols[-len(NEW_COLUMNS) :] == NEW_COLUMNS
    old = store.get_request("old-1")  # a row from before: answered, not a shadow
    assert old["decision"] == "answered" and old["shadow"] is False and old["fallback_prediction"] is None
    # the fast SQLite insert path (SQL built from the column list) writes the new columns
    rec = _rec(
        datetime(2026, 1, 2, tzinfo=UTC),
        2,
        0.4,
        "abstained",
        shadow=True,
        final_prediction=3,
        shadow_confidences=[0.5, 0.7],
        input=np.zeros((1, 8, 8), np.float32),
    )
    assert store.log_requests([rec]) == 1
    row = store.get_request(rec.id)
    assert row["decision"] == "abstained" and row["answer_threshold"] == 0.8 and row["shadow"] is True
    assert row["final_prediction"] == 3 and row["shadow_confidences"] == [0.5, 0.7]
    w = store.recent_confidences()
    assert w.ids == ["old-1", rec.id] and w.decisions == ["answered", "abstained"]
    np.testing.assert_allclose(w.expected_accuracy, [0.93, 0.4])
    assert w.coverage == 0.5
    summary = store.selective_window()
    assert (summary.n, summary.answered, summary.abstained) == (2, 1, 1)
    assert (
        summary.n_labelled_answered == 1 and summary.answered_accuracy_measured == 1.0
    )  # old row: label 4 = prediction 4
    store.dispose()
    again = TrafficStore(f"sqlite:///{path}")  # a second start migrates nothing
    assert again.added_columns == [] and again.count_requests() == 2
    again.dispose()


def test_default_record_is_an_answered_non_shadow_row(store):
    rec = request_record(delta=None, prediction=1, confidence=0.9, expected_accuracy=0.9, confidences=[0.9])
    store.log_requests([rec])
    row = store.get_request(rec.id)
    assert row["decision"] == "answered" and row["answer_threshold"] == 0.0 and row["shadow"] is False
    assert row["final_prediction"] is None and row["shadow_confidences"] is None


def test_record_deferral_updates_decision_and_fallback_prediction(store):
    t = datetime.now(UTC)
    a, b = _rec(t, 1, 0.2, "deferred"), _rec(t, 2, 0.3, "deferred")
    store.log_requests([a, b])
    assert store.record_deferral(a.id, True, 7) is True
    assert store.record_deferral(b.id, False, None) is True
    assert store.record_deferral("no-such-id", True, 1) is False
    ra, rb = store.get_request(a.id), store.get_request(b.id)
    assert (ra["decision"], ra["fallback_prediction"], ra["prediction"]) == ("deferred", 7, 1)
    assert (rb["decision"], rb["fallback_prediction"]) == ("deferral_failed", None)


def test_selective_window_numbers_on_hand_built_rows(store):
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    t = [t0 + timedelta(seconds=i) for i in range(8)]
    rows = [
        _rec(t[0], 1, 0.9),  # answered, label 1: correct
        _rec(t[1], 2, 0.8),  # answered, label 3: wrong
        _rec(t[2], 3, 0.7),  # answered, no label
        _rec(t[3], 4, 0.3, "abstained"),  # label 4: correct but not answered
        _rec(t[4], 5, 0.2, "deferred"),  # fallback says 6, label 6
        _rec(t[5], 6, 0.1, "deferred"),  # forward failed, label 6
        _rec(t[6], 7, 0.95),  # answered, label 7: correct
        _rec(t[7], 8, 0.25, "abstained"),
    ]
    store.log_requests(rows)
    store.record_deferral(rows[4].id, True, 6)
    store.record_deferral(rows[5].id, False, None)
    for i, label in [(0, 1), (1, 3), (3, 4), (4, 6), (5, 6), (6, 7)]:
        store.add_feedback(rows[i].id, label)
    s = store.selective_window()
    assert (s.n, s.answered, s.abstained, s.deferred, s.deferral_failed) == (8, 4, 2, 1, 1)
    assert s.coverage == 0.5
    assert math.isclose(s.answered_accuracy_estimated, (0.9 + 0.8 + 0.7 + 0.95) / 4)
    assert s.n_labelled_answered == 3 and math.isclose(s.answered_accuracy_measured, 2 / 3)
    # windows: the last 4 rows, and a time window
    last4 = store.selective_window(last=4)
    assert (last4.n, last4.answered, last4.abstained, last4.deferred, last4.deferral_failed) == (4, 1, 1, 1, 1)
    assert last4.n_labelled_answered == 1 and last4.answered_accuracy_measured == 1.0
    early = store.selective_window(since=t[0], until=t[3])
    assert (early.n, early.answered, early.n_labelled_answered) == (3, 3, 2) and early.answered_accuracy_measured == 0.5
    assert store.selective_window(model_version="other").n == 0


def test_shadow_rows_are_the_shadow_rows_with_inputs_oldest_first(store):
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    x = np.arange(4 * 64, dtype=np.float32).reshape(4, 1, 8, 8) / 256
    rows = [
        _rec(t0, 1, 0.9, shadow=True, final_prediction=1, shadow_confidences=[0.4, 0.9], input=x[0]),
        _rec(t0 + timedelta(seconds=1), 2, 0.9, input=x[1]),  # stored input, not a shadow
        _rec(
            t0 + timedelta(seconds=2),
            3,
            0.9,
            "abstained",
            shadow=True,
            final_prediction=5,
            shadow_confidences=[0.2, 0.6],
            input=x[2],
        ),
        _rec(
            t0 + timedelta(seconds=3),
            4,
            0.9,
            shadow=True,
            final_prediction=4,
            shadow_confidences=[0.3, 0.8],
            input=x[3],
        ),
    ]
    store.log_requests(rows)
    sh = store.shadow_rows()
    assert sh.ids == [rows[i].id for i in (0, 2, 3)]
    assert sh.x.dtype == np.float32 and np.array_equal(sh.x, x[[0, 2, 3]])
    assert sh.final_prediction.tolist() == [1, 5, 4] and sh.final_prediction.dtype == np.int64
    np.testing.assert_allclose(sh.confidences, [[0.4, 0.9], [0.2, 0.6], [0.3, 0.8]])
    assert store.shadow_rows(last=1).ids == [rows[3].id]
    assert store.shadow_rows(since=t0 + timedelta(seconds=1), until=t0 + timedelta(seconds=3)).ids == [rows[2].id]
    assert len(store.shadow_rows(until=t0)) == 0

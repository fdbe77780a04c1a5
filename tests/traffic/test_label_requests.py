"""Active labelling: while the champion waits for labels, the monitor's task lists the request ids it wants
labelled (a uniform sample of the version's unlabelled requests) and the look its labels reached; the
traffic store counts a version's labels and returns its labelled answers in label order."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np

from pcee.traffic.store import RequestRecord, TrafficStore
from tests.records import request_record


def _records(version: str, n: int) -> list[RequestRecord]:
    t0 = datetime.now(UTC)
    return [
        request_record(
            time=t0 + timedelta(milliseconds=i), model_version=version, prediction=i % 10, expected_accuracy=i / n
        )
        for i in range(n)
    ]


def test_store_counts_and_returns_a_versions_labels(tmp_path):
    store = TrafficStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    try:
        mine, other = _records("2", 40), _records("1", 10)
        store.log_requests(mine + other)
        t0 = datetime.now(UTC)
        for k, r in enumerate(reversed(mine[:30])):  # labels arrive in the reverse order of the requests
            store.add_feedback(r.id, r.prediction if k % 3 else (r.prediction + 1) % 10, time=t0 + timedelta(seconds=k))
        store.add_feedback(other[0].id, 0)
        assert store.count_labels("2") == 30 and store.count_labels("1") == 1 and store.count_labels("9") == 0
        answers = store.labelled_answers("2")
        assert answers.ids == [r.id for r in reversed(mine[:30])]  # label order
        assert answers.correct.sum() == 20 and np.allclose(
            answers.expected_accuracy, [r.expected_accuracy for r in reversed(mine[:30])]
        )
        wanted = store.unlabelled_ids("2", limit=5, seed=0)
        assert len(wanted) == 5 and set(wanted) <= {r.id for r in mine[30:]}
        assert store.unlabelled_ids("2", limit=5, seed=0) == wanted  # seeded
        assert set(store.unlabelled_ids("2", limit=100)) == {r.id for r in mine[30:]}
    finally:
        store.dispose()


def test_label_requests_lists_wanted_ids_and_the_reached_look(tmp_path, monkeypatch):
    from tasks.monitor import label_requests

    db = tmp_path / "traffic.db"
    monkeypatch.setenv("PCEE_TRAFFIC_URL", f"sqlite:///{db}")
    store = TrafficStore(f"sqlite:///{db}")
    records = _records("2", 400)
    store.log_requests(records)
    for r in records[:120]:
        store.add_feedback(r.id, r.prediction)
    store.dispose()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    meta = {"verification": {"status": "unverified under drift", "label_budget": 150}}
    (bundle / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "labels_wanted.json"
    info = label_requests.fn(str(bundle), "2", str(out))
    assert info["labels"] == "waiting for labels (120/150)" and info["reached_look"] == 100 and info["next_look"] == 150
    assert len(info["wanted_request_ids"]) == 2 * 150 - 120
    assert set(info["wanted_request_ids"]) <= {r.id for r in records[120:]}
    assert json.loads(out.read_text()) == info
    (bundle / "meta.json").write_text(json.dumps({"verification": {"status": "certified"}}))
    assert label_requests.fn(str(bundle), "2", str(out)) is None  # a certified version waits for nothing

"""Labels checked against the model that answered: a label outside its classes is refused when written,
and rows already stored with one (planted here, as an older service or a direct write left them) are
skipped by every reader — the labelled rows of a refit, the monitor's window, the refit itself — and
counted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import insert

from pcee.recalibration import recalibrate
from pcee.traffic.schema import feedback_table
from pcee.traffic.store import LabelOutOfRangeError, RequestRecord, TrafficStore, UnknownRequestError, new_request_id
from tests.records import request_record
from tests.synthetic import make_outputs


def _rec(i: int, t: datetime, num_classes: int | None, version: str = "5") -> RequestRecord:
    return request_record(
        time=t + timedelta(seconds=i),
        model_version=version,
        prediction=i % 10,
        confidence=0.9,
        expected_accuracy=0.9,
        confidences=[0.9, None],
        input=np.full((1, 2, 2), 0.5, np.float32),
        num_classes=num_classes,
    )


@pytest.fixture
def store(tmp_path):
    s = TrafficStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    yield s
    s.dispose()


def _plant(store: TrafficStore, request_id: str, label: int) -> None:
    """A stored label, written past the checks (as a store from before them holds)."""
    with store.engine.begin() as conn:
        conn.execute(insert(feedback_table).values(request_id=request_id, label=label, time=datetime.now(UTC)))


def test_a_label_outside_the_answering_models_classes_is_refused(store):
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ten, three, old = _rec(0, t0, 10), _rec(1, t0, 3, version="2"), _rec(2, t0, None)
    store.log_requests([ten, three, old])
    assert store.add_feedback(ten.id, 9) is True
    with pytest.raises(LabelOutOfRangeError, match=r"valid labels are 0\.\.2") as err:
        store.add_feedback(three.id, 5)  # a valid class of a 10-class model, not of version 2
    assert err.value.model_version == "2"
    with pytest.raises(LabelOutOfRangeError):
        store.add_feedback(old.id, 10, num_classes=10)  # a row logged without a count: checked against the given one
    with pytest.raises(UnknownRequestError):
        store.add_feedback(new_request_id(), 1)
    assert store.get_feedback(three.id) is None and store.get_feedback(old.id) is None
    # the service fills in its own version's count for rows logged before the column existed
    assert store.record_num_classes("5", 10) == 1 and store.get_request(old.id)["num_classes"] == 10


def test_planted_impossible_labels_never_reach_a_reader(store):
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    records = [_rec(i, t0, 10) for i in range(12)]
    store.log_requests(records)
    for i, r in enumerate(records):
        _plant(store, r.id, [3, 10, 1_000_000, -1][i % 4])  # half of them impossible
    assert store.count_impossible_labels() == 9
    rows = store.labelled_inputs()
    assert len(rows) == 3 and set(rows.y.tolist()) == {3} and rows.n_impossible == 9
    assert store.labelled_inputs(last=2).n_impossible == 9  # the count covers the window, not the cut
    window = store.selective_window()
    assert window.n_labelled_answered == 3 and window.n_impossible_labels == 9


def test_the_refit_skips_labels_outside_the_classes():
    """Rows that reach the library refit without the store's check (no class count) are skipped there."""
    from pcee.policies.pcee import PCEEPolicy

    val_logits, val_labels, flops = make_outputs(1500, seed=0)
    policy = PCEEPolicy(delta=0.9, min_count=5).fit(val_logits, val_labels, flops)
    logits, labels, _ = make_outputs(400, gaps=(0.2, 0.1, 0.0), seed=1)
    clean = recalibrate(policy, logits, labels, flops=flops, seed=0)
    planted = np.concatenate([labels, np.full(60, 10), np.full(40, 99)])
    dirty = recalibrate(policy, np.concatenate([logits, logits[:100]]), planted, flops=flops, seed=0)
    assert dirty.n_impossible_labels == 100 and dirty.n_labels == clean.n_labels == 400
    assert dirty.to_dict() | {"n_impossible_labels": 0, "reason": ""} == clean.to_dict() | {"reason": ""}
    assert "100 labelled row(s) skipped" in dirty.reason


def test_labels_copied_from_the_served_answers_are_flagged():
    """The cheap check (pcee.recalibration.label_agreement_check): labels that side with the served answer
    against the final exit far more often than the other way are flagged in the result and its reason,
    and refit nothing when the caller refuses suspect labels; these honest labels pass it."""
    from pcee.policies.pcee import PCEEPolicy
    from pcee.recalibration import label_agreement_check

    val_logits, val_labels, flops = make_outputs(1500, seed=0)
    policy = PCEEPolicy(delta=0.9, min_count=5).fit(val_logits, val_labels, flops)
    logits, labels, _ = make_outputs(400, gaps=(0.2, 0.1, 0.0), seed=1)
    honest = recalibrate(policy, logits, labels, flops=flops, seed=0)
    assert honest.status != "suspect_labels" and honest.label_check is not None
    assert not honest.label_check["flagged"]
    exits = policy.decide(logits)
    served = logits[np.arange(len(labels)), exits].argmax(-1)
    copied = recalibrate(policy, logits, served, flops=flops, seed=0)
    assert copied.status != "suspect_labels" and copied.label_check["flagged"] and "WARNING" in copied.reason
    assert copied.label_check["c"] == 0 and copied.label_check["label_agrees_with_served"] == 1.0
    refused = recalibrate(policy, logits, served, flops=flops, seed=0, refuse_suspect_labels=True)
    assert refused.status == "suspect_labels" and not refused.accepted
    reported = label_agreement_check(policy, logits, served)
    assert reported["flagged"] and reported["p_value"] < 1e-6

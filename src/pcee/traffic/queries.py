"""The traffic store's reads: counts, single rows, and the windows the monitor and the refits read.

Each function takes an open SQLAlchemy connection; :class:`pcee.traffic.store.TrafficStore` drains
the journal before it opens one, so a read sees every answered row.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from pcee.selective import SelectiveSummary, summarize
from pcee.traffic.schema import array_from_bytes, feedback_table, inputs_table, label_is_possible, requests_table


@dataclass(frozen=True)
class ConfidenceWindow:
    ids: list[str]
    times: list[datetime]
    model_versions: list[str]
    exits: np.ndarray  # (n,) int64
    confidences: np.ndarray  # (n, L) float, NaN where an exit was not computed
    decisions: list[str] = field(default_factory=list)  # pcee.selective.DECISIONS per row
    expected_accuracy: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,) at the answering exit

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def coverage(self) -> float | None:
        """Share of the window's rows answered as confident predictions (None for an empty window)."""
        return float(np.mean([d == "answered" for d in self.decisions])) if self.decisions else None


@dataclass(frozen=True)
class LabelledInputs:
    ids: list[str]
    times: list[datetime]
    x: np.ndarray  # (n, C, H, W) float32
    y: np.ndarray  # (n,) int64
    n_impossible: int = 0  # rows of the window skipped: label outside the answering model's classes

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class LabelledAnswers:
    """Labelled requests of one version (:func:`labelled_answers`), in label order."""

    ids: list[str]
    expected_accuracy: np.ndarray
    prediction: np.ndarray
    label: np.ndarray
    n_impossible: int = 0  # labels of the version skipped: outside its classes

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def correct(self) -> np.ndarray:
        return self.prediction == self.label


@dataclass(frozen=True)
class ShadowInputs:
    """Shadow rows with stored inputs: no labels, but the final exit's prediction."""

    ids: list[str]
    times: list[datetime]
    x: np.ndarray  # (n, C, H, W) float32
    final_prediction: np.ndarray  # (n,) int64
    confidences: np.ndarray | None = None  # (n, L) every exit's confidence as served (NaN if unknown)

    def __len__(self) -> int:
        return len(self.ids)


def _utc(t: datetime) -> datetime:
    # SQLite hands back naive datetimes; every time the store writes is UTC
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def _window(q: Any, last: int | None, since: datetime | None, until: datetime | None, model_version: str | None) -> Any:
    """Restrict a ``requests`` query to a window, newest first (callers reverse for oldest first)."""
    if since is not None:
        q = q.where(requests_table.c.time >= since)
    if until is not None:
        q = q.where(requests_table.c.time < until)
    if model_version is not None:
        q = q.where(requests_table.c.model_version == str(model_version))
    q = q.order_by(requests_table.c.time.desc(), requests_table.c.id.desc())
    return q.limit(int(last)) if last is not None else q


def _stack_inputs(rows: Sequence[Any]) -> np.ndarray:
    if not rows:
        return np.zeros((0,), dtype=np.float32)
    return np.stack([array_from_bytes(r.array) for r in rows]).astype(np.float32)


def _confidence_matrix(texts: list[str | None]) -> np.ndarray:
    """JSON lists of per-exit confidences (None: unknown) -> (n, L) float, NaN where unknown."""
    num_exits = max((len(json.loads(t)) for t in texts if t), default=0)
    conf = np.full((len(texts), num_exits), np.nan)
    for i, t in enumerate(texts):
        if t:
            vals = json.loads(t)
            conf[i, : len(vals)] = [np.nan if v is None else v for v in vals]
    return conf


def count_requests(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(requests_table)).scalar_one())


def count_feedback(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(feedback_table)).scalar_one())


def request_ids(conn: Connection) -> set[str]:
    return {row[0] for row in conn.execute(select(requests_table.c.id))}


def get_request(conn: Connection, request_id: str) -> dict[str, Any] | None:
    row = conn.execute(select(requests_table).where(requests_table.c.id == request_id)).mappings().first()
    if row is None:
        return None
    out = dict(row)
    out["confidences"] = json.loads(out["confidences"])
    if out.get("shadow_confidences") is not None:
        out["shadow_confidences"] = json.loads(out["shadow_confidences"])
    out["decision"] = out.get("decision") or "answered"
    out["shadow"] = bool(out.get("shadow") or 0)
    return out


def get_feedback(conn: Connection, request_id: str) -> int | None:
    row = conn.execute(select(feedback_table.c.label).where(feedback_table.c.request_id == request_id)).first()
    return None if row is None else int(row[0])


def get_input(conn: Connection, request_id: str) -> np.ndarray | None:
    row = conn.execute(select(inputs_table.c.array).where(inputs_table.c.request_id == request_id)).first()
    return None if row is None else array_from_bytes(row[0])


def recent_confidences(
    conn: Connection,
    last: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    model_version: str | None = None,
) -> ConfidenceWindow:
    """A window of logged confidences: the ``last`` N rows (count window) and/or rows with
    ``since <= time < until`` (time window), oldest first."""
    r = requests_table.c
    q = select(r.id, r.time, r.model_version, r.exit, r.confidences, r.decision, r.expected_accuracy)
    rows = conn.execute(_window(q, last, since, until, model_version)).all()[::-1]
    return ConfidenceWindow(
        ids=[r.id for r in rows],
        times=[_utc(r.time) for r in rows],
        model_versions=[r.model_version for r in rows],
        exits=np.array([r.exit for r in rows], dtype=np.int64),
        confidences=_confidence_matrix([r.confidences for r in rows]),
        decisions=[r.decision or "answered" for r in rows],
        expected_accuracy=np.array([r.expected_accuracy for r in rows], dtype=np.float64),
    )


def labelled_inputs(
    conn: Connection, since: datetime | None = None, until: datetime | None = None, last: int | None = None
) -> LabelledInputs:
    """Stored inputs that have a possible label (:func:`~pcee.traffic.schema.label_is_possible`), in a
    time window and/or the ``last`` N such rows, oldest first; ``n_impossible`` counts the labelled
    rows of the time window skipped for an impossible label."""
    possible = label_is_possible(feedback_table.c.label, requests_table.c.num_classes)
    q = (
        select(requests_table.c.id, requests_table.c.time, inputs_table.c.array, feedback_table.c.label)
        .join(inputs_table, inputs_table.c.request_id == requests_table.c.id)
        .join(feedback_table, feedback_table.c.request_id == requests_table.c.id)
    )
    rows = conn.execute(_window(q.where(possible), last, since, until, None)).all()[::-1]
    skipped = select(func.count()).select_from(
        _window(q.where(~possible), None, since, until, None).order_by(None).subquery()
    )
    return LabelledInputs(
        ids=[r.id for r in rows],
        times=[_utc(r.time) for r in rows],
        x=_stack_inputs(rows),
        y=np.array([r.label for r in rows], dtype=np.int64),
        n_impossible=int(conn.execute(skipped).scalar_one()),
    )


def _labelled_of(model_version: str, possible: bool = True) -> Any:
    """Feedback joined to the requests of ``model_version``, possible labels only (or impossible ones only)."""
    ok = label_is_possible(feedback_table.c.label, requests_table.c.num_classes)
    return (
        feedback_table.join(requests_table, feedback_table.c.request_id == requests_table.c.id),
        (requests_table.c.model_version == str(model_version)) & (ok if possible else ~ok),
    )


def count_labels(conn: Connection, model_version: str) -> int:
    """Possible labels on requests answered (or declined) by ``model_version``."""
    joined, where = _labelled_of(model_version)
    return int(conn.execute(select(func.count()).select_from(joined).where(where)).scalar_one())


def labelled_answers(conn: Connection, model_version: str) -> LabelledAnswers:
    """Requests of ``model_version`` with a possible label, in the order the labels arrived."""
    joined, where = _labelled_of(model_version)
    r, f = requests_table.c, feedback_table.c
    q = select(r.id, r.expected_accuracy, r.prediction, f.label).select_from(joined).where(where)
    rows = conn.execute(q.order_by(f.time, f.request_id)).all()
    skipped, impossible = _labelled_of(model_version, possible=False)
    n_impossible = int(conn.execute(select(func.count()).select_from(skipped).where(impossible)).scalar_one())
    return LabelledAnswers(
        ids=[row.id for row in rows],
        expected_accuracy=np.array([row.expected_accuracy for row in rows], dtype=np.float64),
        prediction=np.array([row.prediction for row in rows], dtype=np.int64),
        label=np.array([row.label for row in rows], dtype=np.int64),
        n_impossible=n_impossible,
    )


def unlabelled_ids(conn: Connection, model_version: str, limit: int, seed: int = 0) -> list[str]:
    """Up to ``limit`` request ids of ``model_version`` without feedback, a seeded uniform sample."""
    q = (
        select(requests_table.c.id)
        .join(feedback_table, feedback_table.c.request_id == requests_table.c.id, isouter=True)
        .where(requests_table.c.model_version == str(model_version), feedback_table.c.request_id.is_(None))
        .order_by(requests_table.c.id)
    )
    ids = [row[0] for row in conn.execute(q)]
    keep = np.random.default_rng(int(seed)).permutation(len(ids))[: int(limit)]
    return [ids[i] for i in sorted(keep)]


def count_impossible_labels(conn: Connection) -> int:
    """Stored feedback rows whose label is outside the answering model's classes (every reader skips them)."""
    q = (
        select(func.count())
        .select_from(feedback_table.join(requests_table, requests_table.c.id == feedback_table.c.request_id))
        .where(~label_is_possible(feedback_table.c.label, requests_table.c.num_classes))
    )
    return int(conn.execute(q).scalar_one())


def selective_window(
    conn: Connection,
    last: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    model_version: str | None = None,
) -> SelectiveSummary:
    """Coverage and accuracy on answered requests of a window (like :func:`recent_confidences`).

    The measured accuracy uses the rows with feedback: a deferred row is compared with the
    fallback's prediction, every other row with its own prediction (only answered rows enter the
    measured accuracy, see :func:`pcee.selective.summarize`)."""
    r = requests_table.c
    label = feedback_table.c.label
    q = select(
        r.decision,
        r.expected_accuracy,
        r.prediction,
        r.fallback_prediction,
        label,
        label_is_possible(label, r.num_classes),
    ).join(feedback_table, feedback_table.c.request_id == r.id, isouter=True)
    rows = conn.execute(_window(q, last, since, until, model_version)).all()
    decision = np.array([r.decision or "answered" for r in rows], dtype=object)
    expected = np.array([r.expected_accuracy for r in rows], dtype=np.float64)
    correct = np.full(len(rows), np.nan)
    impossible = 0
    for i, row in enumerate(rows):
        if row.label is None:
            continue
        if not row[-1]:  # an impossible label: the row counts as unlabelled
            impossible += 1
            continue
        served = row.fallback_prediction if decision[i] == "deferred" else row.prediction
        if served is not None:
            correct[i] = float(int(served) == int(row.label))
    return dataclasses.replace(summarize(decision, expected, correct), n_impossible_labels=impossible)


def shadow_rows(
    conn: Connection, since: datetime | None = None, until: datetime | None = None, last: int | None = None
) -> ShadowInputs:
    """Shadow rows (ran to the final exit) with their stored inputs, in a time window and/or the
    ``last`` N such rows, oldest first: the label-free refit's data."""
    r = requests_table.c
    q = (
        select(r.id, r.time, r.final_prediction, r.shadow_confidences, inputs_table.c.array)
        .join(inputs_table, inputs_table.c.request_id == r.id)
        .where(r.shadow == 1, r.final_prediction.is_not(None))
    )
    rows = conn.execute(_window(q, last, since, until, None)).all()[::-1]
    return ShadowInputs(
        ids=[r.id for r in rows],
        times=[_utc(r.time) for r in rows],
        x=_stack_inputs(rows),
        final_prediction=np.array([r.final_prediction for r in rows], dtype=np.int64),
        confidences=_confidence_matrix([r.shadow_confidences for r in rows]),
    )

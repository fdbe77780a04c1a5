"""The traffic store's tables, the row layout a logged request is written in, and schema migration.

Three tables: ``requests`` (one row per answered sample), ``feedback`` (one label per request id),
``inputs`` (the stored fraction of inputs, ``np.save`` bytes read back with ``allow_pickle=False``:
traffic is user data and is never unpickled).

Schema changes: a database created by an older version lacks the newer nullable columns of
``requests``; :func:`create_schema` adds them on start-up (``ALTER TABLE requests ADD COLUMN``).
Rows written before have ``decision`` 'answered' (the old service answered everything) and
``shadow`` 0. On PostgreSQL the schema is created and migrated in one transaction under an advisory
lock, so replicas starting together do not race.
"""

from __future__ import annotations

import io
import json
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import (
    Column,
    ColumnElement,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    inspect,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

metadata = MetaData()

requests_table = Table(
    "requests",
    metadata,
    Column("id", String(36), primary_key=True),  # uuid4 string: portable across SQLite/Postgres
    Column("time", DateTime(timezone=True), nullable=False, index=True),
    Column("model_version", String(64), nullable=False, index=True),
    Column("delta", Float, nullable=True),
    Column("policy", String(64), nullable=False),
    Column("exit", Integer, nullable=False),
    Column("prediction", Integer, nullable=False),
    Column("confidence", Float, nullable=False),
    Column("expected_accuracy", Float, nullable=False),
    # confidences of every exit computed for this sample (JSON list, null where not computed);
    # the first exit's is always there, which makes it an unbiased drift signal
    Column("confidences", Text, nullable=False),
    Column("confidence_0", Float, nullable=True),  # first exit, a column for fast window queries
    Column("flops", Float, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("input_stored", Integer, nullable=False, default=0),
    # selective answering (added after the first schema: nullable, added to old databases on start-up)
    Column("decision", String(16), nullable=True, default="answered"),  # pcee.selective.DECISIONS
    Column("answer_threshold", Float, nullable=True),  # ρ the decision was made with
    Column("shadow", Integer, nullable=True, default=0),  # 1: also ran to the final exit
    Column("final_prediction", Integer, nullable=True),  # shadow rows: argmax of the final exit
    Column("fallback_prediction", Integer, nullable=True),  # deferred rows: the fallback's answer
    Column("shadow_confidences", Text, nullable=True),  # shadow rows: JSON list, every exit's confidence
    # classes of the model that answered: a feedback label must lie in [0, num_classes) (null: logged
    # before the column existed; the service fills it in for its own version at start-up)
    Column("num_classes", Integer, nullable=True),
)

#: PostgreSQL advisory lock key held while creating/migrating the schema (any constant; "pcee" in ASCII)
SCHEMA_LOCK = 0x70636565

#: what ``ALTER TABLE ... ADD COLUMN`` gives the rows of an older database
MIGRATION_DEFAULTS = {"decision": "'answered'", "shadow": "0"}

feedback_table = Table(
    "feedback",
    metadata,
    Column("request_id", String(36), primary_key=True),  # one label per request: idempotent
    Column("label", Integer, nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
)

inputs_table = Table(
    "inputs",
    metadata,
    Column("request_id", String(36), primary_key=True),
    Column("array", LargeBinary, nullable=False),  # np.save bytes, (C, H, W) float32
)


def new_request_id() -> str:
    return str(uuid.uuid4())


def array_to_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def array_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass(frozen=True)
class RequestRecord:
    """One answered sample as the service logs it."""

    id: str
    time: datetime
    model_version: str
    delta: float | None
    policy: str
    exit: int
    prediction: int
    confidence: float
    expected_accuracy: float
    confidences: Sequence[float | None]  # (L,), None where the exit was not computed
    flops: float
    latency_ms: float
    input: np.ndarray | None = None  # stored for the sampled fraction and for every shadow row
    decision: str = "answered"  # pcee.selective.DECISIONS
    answer_threshold: float | None = 0.0  # ρ
    shadow: bool = False  # also ran to the final exit
    final_prediction: int | None = None  # shadow rows: argmax of the final exit
    fallback_prediction: int | None = None  # deferred rows: the fallback's answer
    shadow_confidences: Sequence[float | None] | None = None  # shadow rows: (L,) every exit's confidence
    num_classes: int | None = None  # classes of the answering model: the valid labels are [0, num_classes)


def sqlite_time(v: Any) -> Any:
    """A datetime as the text SQLAlchemy's SQLite DateTime type writes (so reads parse it back)."""
    if isinstance(v, datetime):
        # isoformat, not strftime("%Y-%m-%d %H:%M:%S.%f"): the same text, without parsing a format
        return v.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    return v


def _finite(values: Iterable[Any]) -> list[float | None]:
    """JSON-able floats: None for a missing or non-finite value."""
    return [None if c is None or not math.isfinite(c) else float(c) for c in values]


#: the ``requests`` columns in table order, the order of :func:`request_row`'s tuples
REQUEST_COLUMNS = tuple(c.name for c in requests_table.columns)
_TIME_AT = REQUEST_COLUMNS.index("time")


def request_row(r: RequestRecord) -> tuple[Any, ...]:
    """The ``requests`` row of a record, in :data:`REQUEST_COLUMNS` order."""
    confs = _finite(r.confidences)
    return (
        r.id,
        r.time,
        str(r.model_version),
        None if r.delta is None else float(r.delta),
        r.policy,
        int(r.exit),
        int(r.prediction),
        float(r.confidence),
        float(r.expected_accuracy),
        json.dumps(confs),
        confs[0] if confs else None,
        float(r.flops),
        float(r.latency_ms),
        int(r.input is not None),
        str(r.decision),
        None if r.answer_threshold is None else float(r.answer_threshold),
        int(bool(r.shadow)),
        None if r.final_prediction is None else int(r.final_prediction),
        None if r.fallback_prediction is None else int(r.fallback_prediction),
        None if r.shadow_confidences is None else json.dumps(_finite(r.shadow_confidences)),
        None if r.num_classes is None else int(r.num_classes),
    )


# the tuple above names its columns by position: a schema change must change both together
assert REQUEST_COLUMNS == (
    "id",
    "time",
    "model_version",
    "delta",
    "policy",
    "exit",
    "prediction",
    "confidence",
    "expected_accuracy",
    "confidences",
    "confidence_0",
    "flops",
    "latency_ms",
    "input_stored",
    "decision",
    "answer_threshold",
    "shadow",
    "final_prediction",
    "fallback_prediction",
    "shadow_confidences",
    "num_classes",
), REQUEST_COLUMNS

#: ``requests`` columns that are NOT NULL (the table's constraint), by position in :data:`REQUEST_COLUMNS`
_NOT_NULL_AT = tuple(i for i, c in enumerate(requests_table.columns) if not c.nullable)


def check_not_null(rows: list[tuple[Any, ...]]) -> None:
    """ValueError for a row with None or NaN (SQLite stores NaN as NULL) in a NOT NULL column."""
    for row in rows:
        for i in _NOT_NULL_AT:
            v = row[i]
            if v is None or v != v:
                raise ValueError(f"request {row[0]}: {REQUEST_COLUMNS[i]} is {v!r}; the traffic store needs a value")


def sqlite_rows(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """:func:`request_row` tuples with the time as SQLite's text (formatted once per distinct time:
    a batch shares one), as the SQLite insert and the journal take them."""
    times: dict[datetime, str] = {}
    out = []
    for row in rows:
        t = row[_TIME_AT]
        text = times.get(t)
        if text is None:
            text = times[t] = sqlite_time(t)
        out.append((*row[:_TIME_AT], text, *row[_TIME_AT + 1 :]))
    return out


def label_is_possible(label: Any, num_classes: Any) -> ColumnElement[bool]:
    """SQL: a feedback label lies in [0, num_classes) of the model that answered (unknown classes: any
    non-negative label). Every reader of labels filters with it."""
    return (label >= 0) & (num_classes.is_(None) | (label < num_classes))


# -- creation and migration ----------------------------------------------------------------------
def create_schema(engine: Engine) -> list[str]:
    """Create what is missing and add the ``requests`` columns an older schema lacks; returns their names."""
    if engine.dialect.name == "postgresql":
        return _create_postgres(engine)
    _create_all(engine)
    return _migrate(engine)


def _add_column_ddl(engine: Engine, col: Column[Any]) -> str:
    ddl = f"ALTER TABLE requests ADD COLUMN {col.name} {col.type.compile(dialect=engine.dialect)}"
    if col.name in MIGRATION_DEFAULTS:
        ddl += f" DEFAULT {MIGRATION_DEFAULTS[col.name]}"
    return ddl


def _create_postgres(engine: Engine) -> list[str]:
    """Create and migrate the schema in one transaction under an advisory lock: two processes
    starting at once (replicas) could otherwise both see no table and both issue CREATE TABLE,
    and the loser fails ("already exists", or a unique violation in PostgreSQL's catalog). DDL
    is transactional here, so the second one waits for the first to commit, then finds
    everything in place."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
        metadata.create_all(conn)
        have = {c["name"] for c in inspect(conn).get_columns("requests")}
        added = []
        for col in requests_table.columns:
            if col.name not in have:
                conn.exec_driver_sql(_add_column_ddl(engine, col))
                added.append(col.name)
    return added


def _create_all(engine: Engine, attempts: int = 5) -> None:
    """``CREATE TABLE``/``INDEX`` of what is missing. Replicas starting together on a new SQLite
    file both see no table and race: the loser's CREATE fails with "already exists". Checking
    again then finds the winner's tables (each CREATE is atomic) and creates only the rest."""
    for attempt in range(attempts):
        try:
            metadata.create_all(engine)
            return
        except OperationalError as err:
            if "already exists" not in str(err) or attempt == attempts - 1:
                raise


def _migrate(engine: Engine) -> list[str]:
    """Add the ``requests`` columns an older schema lacks; returns their names. Safe when two
    processes start together: a column the other one added first is not an error."""
    have = {c["name"] for c in inspect(engine).get_columns("requests")}
    added = []
    for col in requests_table.columns:
        if col.name in have:
            continue
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(_add_column_ddl(engine, col))
            added.append(col.name)
        except Exception:
            if col.name not in {c["name"] for c in inspect(engine).get_columns("requests")}:
                raise
    return added

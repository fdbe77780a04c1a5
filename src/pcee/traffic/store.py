"""The traffic store: one row per answered sample, feedback rows, and a sampled fraction of inputs.

SQLAlchemy 2 Core on any URL (``PCEE_TRAFFIC_URL``, e.g. ``postgresql+psycopg://...``); by
default a SQLite file ``$PCEE_STATE_DIR/traffic.db`` in WAL mode.

Durability: the service logs a batch's rows *before* it answers any request of that batch, so a
request that got a 200 is in the store. On SQLite (a file) a row is logged by appending it to a
journal beside the database (:mod:`pcee.traffic.journal`, ``traffic.db-rows.journal``): one
``write()`` (~0.01 ms) instead of a commit (~0.06 ms alone, ~0.13 ms between model runs, which was
5-6 % of the served p50 at concurrency 1). Once ``write()`` returns the row survives the service
process dying at any moment (``kill -9``, OOM, crash): the OS writes the page cache out. A thread
of the writing process commits the journal into the database ``JOURNAL_DRAIN_DELAY_S`` later, in one
transaction for everything appended since, and every read of the store (in any process) drains the
journal first, so readers see every answered row, including those of a writer killed before its
drain (``INSERT OR IGNORE`` on the request id makes a replayed drain harmless). The database runs
with ``journal_mode=WAL`` and, by default, ``synchronous=NORMAL``: an OS crash or power cut can
lose the last appends and commits (the database stays consistent). We accept that for a traffic
log: an fsync costs ~4 ms here, more than the whole model's latency.
``PCEE_TRAFFIC_SYNCHRONOUS=FULL`` (or ``synchronous="FULL"``) fsyncs every append (and the database
on every commit) for power-loss durability; then the service hands each batch's append to a writer
thread and groups the batches that finish while an fsync runs into one append (group commit,
:mod:`pcee.serving.batcher`), so that cost is shared. ``PCEE_TRAFFIC_JOURNAL=false`` (or
``journal=False``) commits every call instead (the same group commit applies). The commit itself is
one long-lived connection used through the driver, one multi-row ``INSERT`` per table.

PostgreSQL (``PCEE_DB=postgres``, :mod:`pcee.stack.postgres`): the schema is created and migrated
in one transaction under an advisory lock, so replicas starting together do not race; a write is
one transaction (an ``executemany`` per table) and an outage makes it raise, so the service answers
503 rather than a 200 it did not log; ``pool_pre_ping`` replaces the connections a server restart
broke, so logging resumes by itself when the server is back.

Inputs are stored as ``np.save`` bytes and read back with ``np.load(allow_pickle=False)``:
traffic is user data and is never unpickled.

Selective answering (:mod:`pcee.selective`): every row records its ``decision`` (answered, abstained,
deferred, deferral_failed) and the ρ it was decided with; a deferred row gets the fallback's
prediction once the forward returns (:meth:`TrafficStore.record_deferral`). *Shadow* rows also ran
to the final exit: they carry ``final_prediction`` and every exit's confidence
(``shadow_confidences``), and their input is always stored, for the label-free agreement maps.
``confidences`` stays what the served path computed (NaN after the exit), so the drift monitor's
per-exit windows keep their meaning with shadow rows in them.

Schema changes: a database created by an older version lacks the newer nullable columns of
``requests``; :class:`TrafficStore` adds them on start-up (``ALTER TABLE requests ADD COLUMN``), and
rows written before have ``decision`` 'answered' (the old service answered everything) and
``shadow`` 0.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from pcee.selective import SelectiveSummary, summarize
from pcee.settings import Settings
from pcee.traffic.journal import RowJournal

log = logging.getLogger("pcee.traffic")

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

#: how long the drain thread lets journal records gather before it commits them in one transaction
JOURNAL_DRAIN_DELAY_S = 0.05

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
)

#: PostgreSQL advisory lock key held while creating/migrating the schema (any constant; "pcee" in ASCII)
_SCHEMA_LOCK = 0x70636565

#: what ``ALTER TABLE ... ADD COLUMN`` gives the rows of an older database
_MIGRATION_DEFAULTS = {"decision": "'answered'", "shadow": "0"}

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


def default_url() -> str:
    """``PCEE_TRAFFIC_URL`` or a SQLite file under ``$PCEE_STATE_DIR`` (default ``.pcee``): :mod:`pcee.settings`."""
    return Settings().default_traffic_url()


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


def _sqlite_value(v: Any) -> Any:
    # the same text format SQLAlchemy's SQLite DateTime type writes, so reads parse it back
    if isinstance(v, datetime):
        # isoformat, not strftime("%Y-%m-%d %H:%M:%S.%f"): the same text, without parsing a format
        return v.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    return v


def _finite(values: Iterable[Any]) -> list[float | None]:
    """JSON-able floats: None for a missing or non-finite value."""
    return [None if c is None or not math.isfinite(c) else float(c) for c in values]


#: the ``requests`` columns in table order, the order of :func:`_request_row`'s tuples
_REQUEST_COLUMNS = tuple(c.name for c in requests_table.columns)
_TIME_AT = _REQUEST_COLUMNS.index("time")


def _request_row(r: RequestRecord) -> tuple[Any, ...]:
    """The ``requests`` row of a record, in :data:`_REQUEST_COLUMNS` order."""
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
    )


# the tuple above names its columns by position: a schema change must change both together
assert _REQUEST_COLUMNS == (
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
), _REQUEST_COLUMNS


#: rows per INSERT statement: 20 columns x 40 rows stays under SQLite's oldest bound-variable limit (999)
_ROWS_PER_INSERT = 40


@functools.lru_cache(maxsize=256)
def _multi_insert(verb: str, table: str, columns: tuple[str, ...], rows: int) -> str:
    one = f"({', '.join('?' for _ in columns)})"
    return f"{verb} INTO {table} ({', '.join(columns)}) VALUES {', '.join(one for _ in range(rows))}"


#: ``requests`` columns that are NOT NULL (the table's constraint), by position in :data:`_REQUEST_COLUMNS`
_NOT_NULL_AT = tuple(i for i, c in enumerate(requests_table.columns) if not c.nullable)


def _check_not_null(rows: list[tuple[Any, ...]]) -> None:
    """ValueError for a row with None or NaN (SQLite stores NaN as NULL) in a NOT NULL column."""
    for row in rows:
        for i in _NOT_NULL_AT:
            v = row[i]
            if v is None or v != v:
                raise ValueError(f"request {row[0]}: {_REQUEST_COLUMNS[i]} is {v!r}; the traffic store needs a value")


def _sqlite_rows(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """:func:`_request_row` tuples with the time as SQLite's text (formatted once per distinct time:
    a batch shares one), as the SQLite insert and the journal take them."""
    times: dict[datetime, str] = {}
    out = []
    for row in rows:
        t = row[_TIME_AT]
        text = times.get(t)
        if text is None:
            text = times[t] = _sqlite_value(t)
        out.append((*row[:_TIME_AT], text, *row[_TIME_AT + 1 :]))
    return out


def _chunks(rows: Sequence[Any], size: int) -> Sequence[Sequence[Any]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _flat(rows: Sequence[Sequence[Any]]) -> list[Any]:
    return [v for row in rows for v in row]


def _utc(t: datetime) -> datetime:
    # SQLite hands back naive datetimes; every time the store writes is UTC
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def new_request_id() -> str:
    return str(uuid.uuid4())


class UnknownRequestError(KeyError):
    """Feedback for a request id the store has never seen."""


class TrafficStore:
    """Requests, feedback and sampled inputs in one SQL database.

    Parameters
    ----------
    url : SQLAlchemy URL; default :func:`default_url`.
    synchronous : SQLite ``PRAGMA synchronous`` (see the module docstring); default
        ``PCEE_TRAFFIC_SYNCHRONOUS`` or NORMAL.
    """

    def __init__(
        self, url: str | None = None, synchronous: str | None = None, echo: bool = False, journal: bool | None = None
    ) -> None:
        self.url = url or default_url()
        settings = Settings()
        sync = (synchronous or settings.traffic_synchronous).upper()
        if sync not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {sync!r}")
        self.synchronous = sync
        self.is_sqlite = self.url.startswith("sqlite")
        self.journal: RowJournal | None = None
        if self.is_sqlite:
            db_path = self.url.split("///", 1)[-1]
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
                if settings.traffic_journal if journal is None else journal:
                    self.journal = RowJournal(f"{db_path}-rows.journal", fsync=sync in ("FULL", "EXTRA"))
            # check_same_thread=False: the service writes from its batch worker thread and reads
            # from request handlers; SQLAlchemy's pool hands each thread its own connection use.
            self.engine: Engine = create_engine(
                self.url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}
            )
            event.listen(self.engine, "connect", self._sqlite_pragmas)
        else:
            # pool_pre_ping: a pooled connection that died with a server restart is replaced at
            # checkout, so the store recovers on its own once the server is back
            connect_args = {"connect_timeout": 10} if self.url.startswith("postgresql") else {}
            self.engine = create_engine(self.url, echo=echo, pool_pre_ping=True, connect_args=connect_args)
        if self.engine.dialect.name == "postgresql":
            self.added_columns = self._create_postgres()
        else:
            self._create_all()
            self.added_columns = self._migrate()
        self._writer = None
        self._writer_lock = threading.Lock()
        self.skipped_records = 0  # torn journal records this instance's drains skipped
        self._appended = threading.Event()
        self._closing = False
        self._drainer: threading.Thread | None = None
        self._sync()  # the rows of a writer that died before its drain

    # -- the journal ----------------------------------------------------------------------------
    @property
    def log_is_cheap(self) -> bool:
        """Whether :meth:`log_requests` is one ``write()`` (the journal without fsync), cheaper than a
        hand-off to another thread; else it is a commit or an fsync, worth grouping (the batcher)."""
        return self.journal is not None and not self.journal.fsync

    def _sync(self) -> None:
        """Commit what the journal holds (every process's appends), so a read sees every answered row."""
        if self.journal is not None and self.journal.pending():
            self.journal.drain(self._commit_records)

    def _commit_records(self, records: list[bytes]) -> None:
        rows: list[tuple[Any, ...]] = []
        inputs: list[tuple[str, bytes]] = []
        for raw in records:
            try:
                rec = orjson.loads(raw)
                batch_rows = [tuple(r) for r in rec["requests"]]
                batch_inputs = [(rid, base64.b64decode(a)) for rid, a in rec["inputs"]]
            except (ValueError, KeyError, TypeError):
                # a torn append (its writer died inside write(), so its request was never answered)
                self.skipped_records += 1
                log.warning("skipped an unreadable traffic journal record (%d bytes)", len(raw))
                continue
            rows += batch_rows
            inputs += batch_inputs
        if rows or inputs:
            # idempotent: a replayed drain adds nothing. OR IGNORE also skips a row that breaks a NOT
            # NULL constraint instead of failing the drain (log_requests refuses such rows up front)
            self._log_sqlite(rows, inputs, or_ignore=True)

    def _drain_loop(self) -> None:
        while True:
            self._appended.wait()
            if self._closing:
                return
            time.sleep(JOURNAL_DRAIN_DELAY_S)  # let more appends gather: one transaction for all of them
            self._appended.clear()
            try:
                self._sync()
            except Exception:  # the records stay in the journal; a later drain or read commits them
                log.exception("draining the traffic journal into %s failed; retrying", self.url)
                time.sleep(1.0)
                self._appended.set()
            if self._closing:  # dispose() may have set the event before the clear above
                return

    def _connect(self) -> Any:
        self._sync()
        return self.engine.connect()

    def _begin(self) -> Any:
        self._sync()
        return self.engine.begin()

    def _sqlite_pragmas(self, dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={self.synchronous}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    def _create_postgres(self) -> list[str]:
        """Create and migrate the schema in one transaction under an advisory lock: two processes
        starting at once (replicas) could otherwise both see no table and both issue CREATE TABLE,
        and the loser fails ("already exists", or a unique violation in PostgreSQL's catalog). DDL
        is transactional here, so the second one waits for the first to commit, then finds
        everything in place."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
            metadata.create_all(conn)
            have = {c["name"] for c in inspect(conn).get_columns("requests")}
            added = []
            for col in requests_table.columns:
                if col.name not in have:
                    conn.exec_driver_sql(self._add_column_ddl(col))
                    added.append(col.name)
        return added

    def _add_column_ddl(self, col: Column[Any]) -> str:
        ddl = f"ALTER TABLE requests ADD COLUMN {col.name} {col.type.compile(dialect=self.engine.dialect)}"
        if col.name in _MIGRATION_DEFAULTS:
            ddl += f" DEFAULT {_MIGRATION_DEFAULTS[col.name]}"
        return ddl

    def _create_all(self, attempts: int = 5) -> None:
        """``CREATE TABLE``/``INDEX`` of what is missing. Replicas starting together on a new SQLite
        file both see no table and race: the loser's CREATE fails with "already exists". Checking
        again then finds the winner's tables (each CREATE is atomic) and creates only the rest."""
        for attempt in range(attempts):
            try:
                metadata.create_all(self.engine)
                return
            except OperationalError as err:
                if "already exists" not in str(err) or attempt == attempts - 1:
                    raise

    def _migrate(self) -> list[str]:
        """Add the ``requests`` columns an older schema lacks; returns their names. Safe when two
        processes start together: a column the other one added first is not an error."""
        have = {c["name"] for c in inspect(self.engine).get_columns("requests")}
        added = []
        for col in requests_table.columns:
            if col.name in have:
                continue
            ddl = self._add_column_ddl(col)
            try:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(ddl)
                added.append(col.name)
            except Exception:
                if col.name not in {c["name"] for c in inspect(self.engine).get_columns("requests")}:
                    raise
        return added

    # -- writes ---------------------------------------------------------------------------------
    def log_requests(self, records: Iterable[RequestRecord]) -> int:
        """Log records durably (in the journal, or committed in one transaction). Returns the row count.

        Raises (and logs nothing) when the write fails: the caller must not report these rows as
        logged. With the journal, a duplicate request id is dropped when the journal is drained
        (the first row stays); without it, it fails the transaction."""
        rows, inputs = [], []
        for r in records:
            rows.append(_request_row(r))
            if r.input is not None:
                inputs.append((r.id, array_to_bytes(np.asarray(r.input, dtype=np.float32))))
        if not rows:
            return 0
        if self.journal is not None:
            _check_not_null(rows)  # what the drain's insert would refuse fails the call now, not later
            payload = {
                "requests": _sqlite_rows(rows),
                "inputs": [(rid, base64.b64encode(a).decode("ascii")) for rid, a in inputs],
            }
            self.journal.append(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY))  # durable on return
            if self._drainer is None:
                self._drainer = threading.Thread(target=self._drain_loop, name="pcee-journal-drain", daemon=True)
                self._drainer.start()
            if not self._appended.is_set():  # a plain read; set() takes a lock
                self._appended.set()
            return len(rows)
        if self.is_sqlite:
            self._log_sqlite(_sqlite_rows(rows), inputs)
            return len(rows)
        with self.engine.begin() as conn:
            conn.execute(requests_table.insert(), [dict(zip(_REQUEST_COLUMNS, row, strict=True)) for row in rows])
            if inputs:
                conn.execute(inputs_table.insert(), [{"request_id": rid, "array": a} for rid, a in inputs])
        return len(rows)

    def _log_sqlite(
        self, params: Sequence[Sequence[Any]], inputs: list[tuple[str, bytes]], or_ignore: bool = False
    ) -> None:
        # One long-lived connection used through the sqlite3 driver itself, rows as
        # :func:`_sqlite_rows` made them. ``or_ignore``: a row whose id is there already is skipped.
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        with self._writer_lock:
            if self._writer is None:
                self._writer = self.engine.raw_connection()
            conn: Any = self._writer.driver_connection  # the sqlite3.Connection itself
            try:
                # one multi-row INSERT per table, not executemany: the driver releases the GIL around
                # every statement step, and each release is a chance to wait (up to the interpreter's
                # switch interval) for the event loop to hand it back
                for chunk in _chunks(params, _ROWS_PER_INSERT):
                    conn.execute(_multi_insert(verb, "requests", _REQUEST_COLUMNS, len(chunk)), _flat(chunk))
                for chunk in _chunks(inputs, _ROWS_PER_INSERT):
                    conn.execute(_multi_insert(verb, "inputs", ("request_id", "array"), len(chunk)), _flat(chunk))
                conn.commit()
            except BaseException:
                try:
                    conn.rollback()
                except Exception:  # a broken connection: the next write opens a new one
                    self._close_writer()
                raise

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass

    def record_deferral(self, request_id: str, ok: bool, fallback_prediction: int | None = None) -> bool:
        """After the forward of a deferred row: decision ``deferred`` with the fallback's prediction
        (``ok``), else ``deferral_failed``. Returns whether the row exists."""
        return self.record_deferrals([(request_id, ok, fallback_prediction)]) == 1

    def record_deferrals(self, outcomes: Iterable[tuple[str, bool, int | None]]) -> int:
        """:meth:`record_deferral` for many rows in one transaction; returns the rows updated."""
        params = [
            {
                "rid": rid,
                "decision": "deferred" if ok else "deferral_failed",
                "fallback_prediction": None if (not ok or pred is None) else int(pred),
            }
            for rid, ok, pred in outcomes
        ]
        if not params:
            return 0
        stmt = (
            update(requests_table)
            .where(requests_table.c.id == bindparam("rid"))
            .values(decision=bindparam("decision"), fallback_prediction=bindparam("fallback_prediction"))
        )
        with self._begin() as conn:
            return int(conn.execute(stmt, params).rowcount or 0)

    def add_feedback(self, request_id: str, label: int, time: datetime | None = None) -> bool:
        """Record the true label of a request. Idempotent: a repeated id keeps the first label.

        Returns True if a row was added, False if feedback already existed.
        Raises :class:`UnknownRequestError` for an id that was never logged.
        """
        time = time or datetime.now(UTC)
        with self._begin() as conn:
            known = conn.execute(select(requests_table.c.id).where(requests_table.c.id == request_id)).first()
            if known is None:
                raise UnknownRequestError(request_id)
            values = {"request_id": request_id, "label": int(label), "time": time}
            dialect = self.engine.dialect.name
            if dialect == "sqlite":
                stmt = sqlite_insert(feedback_table).values(values).on_conflict_do_nothing()
            elif dialect == "postgresql":
                # RETURNING, not rowcount: SQLAlchemy reports -1 as the rowcount of this INSERT on psycopg 3
                stmt = pg_insert(feedback_table).values(values).on_conflict_do_nothing()
                return conn.execute(stmt.returning(feedback_table.c.request_id)).first() is not None
            else:  # portable fallback: check, then insert
                if conn.execute(
                    select(feedback_table.c.request_id).where(feedback_table.c.request_id == request_id)
                ).first():
                    return False
                stmt = feedback_table.insert().values(values)
            return conn.execute(stmt).rowcount == 1

    # -- reads ----------------------------------------------------------------------------------
    def count_requests(self) -> int:
        with self._connect() as conn:
            return int(conn.execute(select(func.count()).select_from(requests_table)).scalar_one())

    def count_feedback(self) -> int:
        with self._connect() as conn:
            return int(conn.execute(select(func.count()).select_from(feedback_table)).scalar_one())

    # -- labels of one version (pcee.few_labels, pcee.verification) ------------------------------
    def count_labels(self, model_version: str) -> int:
        """Feedback labels on requests answered (or declined) by ``model_version``."""
        q = (
            select(func.count())
            .select_from(feedback_table.join(requests_table, feedback_table.c.request_id == requests_table.c.id))
            .where(requests_table.c.model_version == str(model_version))
        )
        with self._connect() as conn:
            return int(conn.execute(q).scalar_one())

    def labelled_answers(self, model_version: str) -> LabelledAnswers:
        """Requests of ``model_version`` with feedback, in the order the labels arrived: what the version
        logged (expected accuracy at its exit, its own prediction) and the label."""
        q = (
            select(
                requests_table.c.id,
                requests_table.c.expected_accuracy,
                requests_table.c.prediction,
                feedback_table.c.label,
            )
            .join(feedback_table, feedback_table.c.request_id == requests_table.c.id)
            .where(requests_table.c.model_version == str(model_version))
            .order_by(feedback_table.c.time, feedback_table.c.request_id)
        )
        with self._connect() as conn:
            rows = conn.execute(q).all()
        return LabelledAnswers(
            ids=[r.id for r in rows],
            expected_accuracy=np.array([r.expected_accuracy for r in rows], dtype=np.float64),
            prediction=np.array([r.prediction for r in rows], dtype=np.int64),
            label=np.array([r.label for r in rows], dtype=np.int64),
        )

    def unlabelled_ids(self, model_version: str, limit: int, seed: int = 0) -> list[str]:
        """Up to ``limit`` request ids of ``model_version`` without feedback, a seeded uniform sample (the
        labels the monitor asks for: a uniform sample keeps the few-label certificate about all traffic)."""
        q = (
            select(requests_table.c.id)
            .join(feedback_table, feedback_table.c.request_id == requests_table.c.id, isouter=True)
            .where(requests_table.c.model_version == str(model_version), feedback_table.c.request_id.is_(None))
            .order_by(requests_table.c.id)
        )
        with self._connect() as conn:
            ids = [r[0] for r in conn.execute(q)]
        keep = np.random.default_rng(int(seed)).permutation(len(ids))[: int(limit)]
        return [ids[i] for i in sorted(keep)]

    def request_ids(self) -> set[str]:
        with self._connect() as conn:
            return {row[0] for row in conn.execute(select(requests_table.c.id))}

    def get_request(self, request_id: str) -> dict[str, Any] | None:
        with self._connect() as conn:
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

    def get_feedback(self, request_id: str) -> int | None:
        with self._connect() as conn:
            row = conn.execute(select(feedback_table.c.label).where(feedback_table.c.request_id == request_id)).first()
        return None if row is None else int(row[0])

    def get_input(self, request_id: str) -> np.ndarray | None:
        with self._connect() as conn:
            row = conn.execute(select(inputs_table.c.array).where(inputs_table.c.request_id == request_id)).first()
        return None if row is None else array_from_bytes(row[0])

    def recent_confidences(
        self,
        last: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        model_version: str | None = None,
    ) -> ConfidenceWindow:
        """A window of logged confidences: the ``last`` N rows (count window) and/or rows with
        ``since <= time < until`` (time window), oldest first."""
        q = select(
            requests_table.c.id,
            requests_table.c.time,
            requests_table.c.model_version,
            requests_table.c.exit,
            requests_table.c.confidences,
            requests_table.c.decision,
            requests_table.c.expected_accuracy,
        )
        q = _window(q, last, since, until, model_version)
        with self._connect() as conn:
            rows = conn.execute(q).all()[::-1]
        num_exits = max((len(json.loads(r.confidences)) for r in rows[:1]), default=0)
        conf = np.full((len(rows), num_exits), np.nan)
        for i, r in enumerate(rows):
            vals = json.loads(r.confidences)
            conf[i, : len(vals)] = [np.nan if v is None else v for v in vals]
        return ConfidenceWindow(
            ids=[r.id for r in rows],
            times=[_utc(r.time) for r in rows],
            model_versions=[r.model_version for r in rows],
            exits=np.array([r.exit for r in rows], dtype=np.int64),
            confidences=conf,
            decisions=[r.decision or "answered" for r in rows],
            expected_accuracy=np.array([r.expected_accuracy for r in rows], dtype=np.float64),
        )

    def labelled_inputs(
        self, since: datetime | None = None, until: datetime | None = None, last: int | None = None
    ) -> LabelledInputs:
        """Stored inputs that have feedback, in a time window and/or the ``last`` N such rows, oldest first."""
        q = (
            select(requests_table.c.id, requests_table.c.time, inputs_table.c.array, feedback_table.c.label)
            .join(inputs_table, inputs_table.c.request_id == requests_table.c.id)
            .join(feedback_table, feedback_table.c.request_id == requests_table.c.id)
        )
        if since is not None:
            q = q.where(requests_table.c.time >= since)
        if until is not None:
            q = q.where(requests_table.c.time < until)
        q = q.order_by(requests_table.c.time.desc(), requests_table.c.id.desc())
        if last is not None:
            q = q.limit(int(last))
        with self._connect() as conn:
            rows = conn.execute(q).all()[::-1]
        if rows:
            x = np.stack([array_from_bytes(r.array) for r in rows]).astype(np.float32)
        else:
            x = np.zeros((0,), dtype=np.float32)
        return LabelledInputs(
            ids=[r.id for r in rows],
            times=[_utc(r.time) for r in rows],
            x=x,
            y=np.array([r.label for r in rows], dtype=np.int64),
        )

    def selective_window(
        self,
        last: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        model_version: str | None = None,
    ) -> SelectiveSummary:
        """Coverage and accuracy on answered requests of a window (like :meth:`recent_confidences`).

        The measured accuracy uses the rows with feedback: a deferred row is compared with the
        fallback's prediction, every other row with its own prediction (only answered rows enter the
        measured accuracy, see :func:`pcee.selective.summarize`)."""
        q = select(
            requests_table.c.decision,
            requests_table.c.expected_accuracy,
            requests_table.c.prediction,
            requests_table.c.fallback_prediction,
            feedback_table.c.label,
        ).join(feedback_table, feedback_table.c.request_id == requests_table.c.id, isouter=True)
        q = _window(q, last, since, until, model_version)
        with self._connect() as conn:
            rows = conn.execute(q).all()
        decision = np.array([r.decision or "answered" for r in rows], dtype=object)
        expected = np.array([r.expected_accuracy for r in rows], dtype=np.float64)
        correct = np.full(len(rows), np.nan)
        for i, r in enumerate(rows):
            if r.label is None:
                continue
            served = r.fallback_prediction if decision[i] == "deferred" else r.prediction
            if served is not None:
                correct[i] = float(int(served) == int(r.label))
        return summarize(decision, expected, correct)

    def shadow_rows(
        self, since: datetime | None = None, until: datetime | None = None, last: int | None = None
    ) -> ShadowInputs:
        """Shadow rows (ran to the final exit) with their stored inputs, in a time window and/or the
        ``last`` N such rows, oldest first: the label-free refit's data."""
        q = (
            select(
                requests_table.c.id,
                requests_table.c.time,
                requests_table.c.final_prediction,
                requests_table.c.shadow_confidences,
                inputs_table.c.array,
            )
            .join(inputs_table, inputs_table.c.request_id == requests_table.c.id)
            .where(requests_table.c.shadow == 1, requests_table.c.final_prediction.is_not(None))
        )
        q = _window(q, last, since, until, None)
        with self._connect() as conn:
            rows = conn.execute(q).all()[::-1]
        x = (
            np.stack([array_from_bytes(r.array) for r in rows]).astype(np.float32)
            if rows
            else np.zeros((0,), dtype=np.float32)
        )
        num_exits = max((len(json.loads(r.shadow_confidences)) for r in rows if r.shadow_confidences), default=0)
        conf = np.full((len(rows), num_exits), np.nan)
        for i, r in enumerate(rows):
            if r.shadow_confidences:
                vals = json.loads(r.shadow_confidences)
                conf[i, : len(vals)] = [np.nan if v is None else v for v in vals]
        return ShadowInputs(
            ids=[r.id for r in rows],
            times=[_utc(r.time) for r in rows],
            x=x,
            final_prediction=np.array([r.final_prediction for r in rows], dtype=np.int64),
            confidences=conf,
        )

    def journal_mode(self) -> str | None:
        """SQLite's journal mode ('wal' when durable logging is on); None for other databases."""
        if not self.is_sqlite:
            return None
        with self._connect() as conn:
            return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()).lower()

    def dispose(self) -> None:
        """Stop the drain thread, commit what the journal holds, and close every connection."""
        self._closing = True
        self._appended.set()
        if self._drainer is not None:
            self._drainer.join(10)
        try:
            self._sync()
        finally:
            if self.journal is not None:
                self.journal.close()
            with self._writer_lock:
                self._close_writer()
            self.engine.dispose()


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

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class LabelledAnswers:
    """Labelled requests of one version (:meth:`TrafficStore.labelled_answers`), in label order."""

    ids: list[str]
    expected_accuracy: np.ndarray
    prediction: np.ndarray
    label: np.ndarray

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

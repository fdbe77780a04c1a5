"""The traffic store's writes: logging answered rows (through the journal on SQLite), deferral
outcomes, feedback labels; and the thread that drains the journal into the database.

:mod:`pcee.traffic.store` explains the durability story; this module is its mechanism.
"""

from __future__ import annotations

import base64
import functools
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from pcee.traffic.journal import RowJournal
from pcee.traffic.schema import (
    REQUEST_COLUMNS,
    RequestRecord,
    array_to_bytes,
    check_not_null,
    feedback_table,
    inputs_table,
    request_row,
    requests_table,
    sqlite_rows,
)

log = logging.getLogger("pcee.traffic")

#: how long the drain thread lets journal records gather before it commits them in one transaction
JOURNAL_DRAIN_DELAY_S = 0.05

#: rows per INSERT statement: 21 columns x 40 rows stays under SQLite's oldest bound-variable limit (999)
ROWS_PER_INSERT = 40


class UnknownRequestError(KeyError):
    """Feedback for a request id the store has never seen."""


class LabelOutOfRangeError(ValueError):
    """Feedback whose label is not a class of the model version that answered the request."""

    def __init__(self, request_id: str, label: int, num_classes: int, model_version: str) -> None:
        super().__init__(
            f"label {label} is not a class of model version {model_version}, which answered request "
            f"{request_id}: valid labels are 0..{num_classes - 1}"
        )
        self.label, self.num_classes, self.model_version = label, num_classes, model_version


@functools.lru_cache(maxsize=256)
def _multi_insert(verb: str, table: str, columns: tuple[str, ...], rows: int) -> str:
    one = f"({', '.join('?' for _ in columns)})"
    return f"{verb} INTO {table} ({', '.join(columns)}) VALUES {', '.join(one for _ in range(rows))}"


def _chunks(rows: Sequence[Any], size: int) -> Sequence[Sequence[Any]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _flat(rows: Sequence[Sequence[Any]]) -> list[Any]:
    return [v for row in rows for v in row]


class TrafficWriter:
    """Every write of one store: ``engine`` (its SQLite pragmas already set) and, on SQLite, the
    ``journal`` rows are appended to. :meth:`sync` commits what the journal holds; readers call it
    before every read."""

    def __init__(self, engine: Engine, journal: RowJournal | None) -> None:
        self.engine = engine
        self.journal = journal
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._conn: Any = None  # the long-lived raw SQLite connection of _log_sqlite
        self._lock = threading.Lock()
        self.skipped_records = 0  # torn journal records this writer's drains skipped
        self._appended = threading.Event()
        self._closing = False
        self._drainer: threading.Thread | None = None

    # -- the journal ----------------------------------------------------------------------------
    @property
    def log_is_cheap(self) -> bool:
        """Whether :meth:`log_requests` is one ``write()`` (the journal without fsync)."""
        return self.journal is not None and not self.journal.fsync

    def sync(self) -> None:
        """Commit what the journal holds (every process's appends), so a read sees every answered row."""
        if self.journal is not None and self.journal.pending():
            self.journal.drain(self.commit_records)

    def commit_records(self, records: list[bytes]) -> None:
        """The drain's callback: insert the rows of journal records, skipping torn ones (idempotent)."""
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
                self.sync()
            except Exception:  # the records stay in the journal; a later drain or read commits them
                log.exception("draining the traffic journal into %s failed; retrying", self.engine.url)
                time.sleep(1.0)
                self._appended.set()
            if self._closing:  # close() may have set the event before the clear above
                return

    # -- rows -----------------------------------------------------------------------------------
    def log_requests(self, records: Iterable[RequestRecord]) -> int:
        """Log records durably (in the journal, or committed in one transaction). Returns the row count.

        Raises (and logs nothing) when the write fails: the caller must not report these rows as
        logged. With the journal, a duplicate request id is dropped when the journal is drained
        (the first row stays); without it, it fails the transaction."""
        rows, inputs = [], []
        for r in records:
            rows.append(request_row(r))
            if r.input is not None:
                inputs.append((r.id, array_to_bytes(np.asarray(r.input, dtype=np.float32))))
        if not rows:
            return 0
        if self.journal is not None:
            self._append(rows, inputs)
        elif self.is_sqlite:
            self._log_sqlite(sqlite_rows(rows), inputs)
        else:
            with self.engine.begin() as conn:
                conn.execute(requests_table.insert(), [dict(zip(REQUEST_COLUMNS, row, strict=True)) for row in rows])
                if inputs:
                    conn.execute(inputs_table.insert(), [{"request_id": rid, "array": a} for rid, a in inputs])
        return len(rows)

    def _append(self, rows: list[tuple[Any, ...]], inputs: list[tuple[str, bytes]]) -> None:
        if self.journal is None:
            raise RuntimeError("no journal to append to")
        check_not_null(rows)  # what the drain's insert would refuse fails the call now, not later
        payload = {
            "requests": sqlite_rows(rows),
            "inputs": [(rid, base64.b64encode(a).decode("ascii")) for rid, a in inputs],
        }
        self.journal.append(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY))  # durable on return
        if self._drainer is None:
            self._drainer = threading.Thread(target=self._drain_loop, name="pcee-journal-drain", daemon=True)
            self._drainer.start()
        if not self._appended.is_set():  # a plain read; set() takes a lock
            self._appended.set()

    def _log_sqlite(
        self, params: Sequence[Sequence[Any]], inputs: list[tuple[str, bytes]], or_ignore: bool = False
    ) -> None:
        # One long-lived connection used through the sqlite3 driver itself, rows as
        # sqlite_rows made them. ``or_ignore``: a row whose id is there already is skipped.
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        with self._lock:
            if self._conn is None:
                self._conn = self.engine.raw_connection()
            conn: Any = self._conn.driver_connection  # the sqlite3.Connection itself
            try:
                # one multi-row INSERT per table, not executemany: the driver releases the GIL around
                # every statement step, and each release is a chance to wait (up to the interpreter's
                # switch interval) for the event loop to hand it back
                for chunk in _chunks(params, ROWS_PER_INSERT):
                    conn.execute(_multi_insert(verb, "requests", REQUEST_COLUMNS, len(chunk)), _flat(chunk))
                for chunk in _chunks(inputs, ROWS_PER_INSERT):
                    conn.execute(_multi_insert(verb, "inputs", ("request_id", "array"), len(chunk)), _flat(chunk))
                conn.commit()
            except BaseException:
                try:
                    conn.rollback()
                except Exception:  # a broken connection: the next write opens a new one
                    self._close_conn()
                raise

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def record_deferrals(self, outcomes: Iterable[tuple[str, bool, int | None]]) -> int:
        """After the forward of deferred rows: decision ``deferred`` with the fallback's prediction
        (ok), else ``deferral_failed``; in one transaction. Returns the rows updated."""
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
        self.sync()
        with self.engine.begin() as conn:
            return int(conn.execute(stmt, params).rowcount or 0)

    def add_feedback(
        self, request_id: str, label: int, time: datetime | None = None, num_classes: int | None = None
    ) -> bool:
        """Record the true label of a request. Idempotent: a repeated id keeps the first label.

        Returns True if a row was added, False if feedback already existed.
        Raises :class:`UnknownRequestError` for an id that was never logged, and
        :class:`LabelOutOfRangeError` for a label outside [0, classes of the version that answered it)
        (``num_classes``: the count to check rows logged without one against).
        """
        time = time or datetime.now(UTC)
        self.sync()
        r = requests_table.c
        with self.engine.begin() as conn:
            known = conn.execute(select(r.num_classes, r.model_version).where(r.id == request_id)).first()
            if known is None:
                raise UnknownRequestError(request_id)
            classes = known.num_classes if known.num_classes is not None else num_classes
            if label < 0 and classes is None:
                raise ValueError(f"a label is a non-negative class index, got {label}")
            if label < 0 or (classes is not None and label >= classes):
                raise LabelOutOfRangeError(request_id, int(label), int(classes or 0), str(known.model_version))
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

    def record_num_classes(self, model_version: str, num_classes: int) -> int:
        """Fill in the class count of ``model_version``'s rows logged before the column existed; returns
        how many rows it set."""
        stmt = (
            update(requests_table)
            .where(requests_table.c.model_version == str(model_version), requests_table.c.num_classes.is_(None))
            .values(num_classes=int(num_classes))
        )
        self.sync()
        with self.engine.begin() as conn:
            return int(conn.execute(stmt).rowcount or 0)

    def close(self) -> None:
        """Stop the drain thread, commit what the journal holds, close the raw connection."""
        self._closing = True
        self._appended.set()
        if self._drainer is not None:
            self._drainer.join(10)
        try:
            self.sync()
        finally:
            if self.journal is not None:
                self.journal.close()
            with self._lock:
                self._close_conn()

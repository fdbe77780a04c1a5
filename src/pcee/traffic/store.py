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

The store is three modules with one job each, behind this facade: :mod:`pcee.traffic.schema` (tables,
row layout, migration), :mod:`pcee.traffic.writer` (the journal and every write) and
:mod:`pcee.traffic.queries` (every read).

Selective answering (:mod:`pcee.selective`): every row records its ``decision`` (answered, abstained,
deferred, deferral_failed) and the ρ it was decided with; a deferred row gets the fallback's
prediction once the forward returns (:meth:`TrafficStore.record_deferral`). *Shadow* rows also ran
to the final exit: they carry ``final_prediction`` and every exit's confidence
(``shadow_confidences``), and their input is always stored, for the label-free agreement maps.
``confidences`` stays what the served path computed (NaN after the exit), so the drift monitor's
per-exit windows keep their meaning with shadow rows in them.

Schema changes: see :mod:`pcee.traffic.schema` (newer nullable columns are added on start-up).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from pcee.selective import SelectiveSummary
from pcee.settings import Settings
from pcee.stack import default_traffic_url
from pcee.traffic import queries
from pcee.traffic.journal import RowJournal
from pcee.traffic.queries import ConfidenceWindow, LabelledAnswers, LabelledInputs, ShadowInputs
from pcee.traffic.schema import (
    SCHEMA_LOCK,
    RequestRecord,
    array_from_bytes,
    array_to_bytes,
    create_schema,
    new_request_id,
)
from pcee.traffic.writer import JOURNAL_DRAIN_DELAY_S, LabelOutOfRangeError, TrafficWriter, UnknownRequestError

__all__ = [
    "JOURNAL_DRAIN_DELAY_S",
    "SCHEMA_LOCK",
    "SYNCHRONOUS_MODES",
    "ConfidenceWindow",
    "LabelOutOfRangeError",
    "LabelledInputs",
    "RequestRecord",
    "ShadowInputs",
    "TrafficStore",
    "UnknownRequestError",
    "array_from_bytes",
    "array_to_bytes",
    "new_request_id",
]

log = logging.getLogger("pcee.traffic")

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


class TrafficStore:
    """Requests, feedback and sampled inputs in one SQL database.

    Parameters
    ----------
    url : SQLAlchemy URL (:meth:`from_settings` builds it from :class:`pcee.settings.Settings`).
    synchronous : SQLite ``PRAGMA synchronous`` (see the module docstring).
    journal : SQLite file: log through the append-only journal (False: a commit per call).
    """

    def __init__(self, url: str, synchronous: str = "NORMAL", echo: bool = False, journal: bool = True) -> None:
        self.url = url
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {sync!r}")
        self.synchronous = sync
        self.is_sqlite = self.url.startswith("sqlite")
        self.journal: RowJournal | None = None
        if self.is_sqlite:
            db_path = self.url.split("///", 1)[-1]
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
                if journal:
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
        self.added_columns = create_schema(self.engine)
        self.writer = TrafficWriter(self.engine, self.journal)
        self.writer.sync()  # the rows of a writer that died before its drain

    @classmethod
    def from_settings(cls, settings: Settings, url: str | None = None) -> TrafficStore:
        """The store ``settings`` describe (``PCEE_TRAFFIC_URL`` or its default, ``PCEE_TRAFFIC_SYNCHRONOUS``,
        ``PCEE_TRAFFIC_JOURNAL``); ``url`` overrides the URL."""
        return cls(
            url or default_traffic_url(settings),
            synchronous=settings.traffic_synchronous,
            journal=settings.traffic_journal,
        )

    def _sqlite_pragmas(self, dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={self.synchronous}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    def _connect(self) -> Any:
        self.writer.sync()
        return self.engine.connect()

    # -- writes (pcee.traffic.writer) -----------------------------------------------------------
    @property
    def log_is_cheap(self) -> bool:
        """Whether :meth:`log_requests` is one ``write()`` (the journal without fsync), cheaper than a
        hand-off to another thread; else it is a commit or an fsync, worth grouping (the batcher)."""
        return self.writer.log_is_cheap

    @property
    def skipped_records(self) -> int:
        """Torn journal records this store's drains skipped."""
        return self.writer.skipped_records

    def log_requests(self, records: Any) -> int:
        """:meth:`pcee.traffic.writer.TrafficWriter.log_requests`: durable once it returns."""
        return self.writer.log_requests(records)

    def record_deferral(self, request_id: str, ok: bool, fallback_prediction: int | None = None) -> bool:
        """After the forward of a deferred row: decision ``deferred`` with the fallback's prediction
        (``ok``), else ``deferral_failed``. Returns whether the row exists."""
        return self.writer.record_deferrals([(request_id, ok, fallback_prediction)]) == 1

    def record_deferrals(self, outcomes: Any) -> int:
        return self.writer.record_deferrals(outcomes)

    def add_feedback(
        self, request_id: str, label: int, time: datetime | None = None, num_classes: int | None = None
    ) -> bool:
        """:meth:`pcee.traffic.writer.TrafficWriter.add_feedback` (True: added; False: already there;
        raises for an unknown id or a label outside the answering model's classes)."""
        return self.writer.add_feedback(request_id, label, time, num_classes)

    def record_num_classes(self, model_version: str, num_classes: int) -> int:
        """Set the class count of ``model_version``'s rows logged without one (older databases)."""
        return self.writer.record_num_classes(model_version, num_classes)

    # -- reads (pcee.traffic.queries) -----------------------------------------------------------
    def count_requests(self) -> int:
        with self._connect() as conn:
            return queries.count_requests(conn)

    def count_feedback(self) -> int:
        with self._connect() as conn:
            return queries.count_feedback(conn)

    # -- labels of one version (pcee.few_labels, pcee.verification) ------------------------------
    def count_labels(self, model_version: str) -> int:
        """Possible labels on requests answered (or declined) by ``model_version``."""
        with self._connect() as conn:
            return queries.count_labels(conn, model_version)

    def labelled_answers(self, model_version: str) -> LabelledAnswers:
        """Requests of ``model_version`` with a possible label, in the order the labels arrived: what the
        version logged (expected accuracy at its exit, its own prediction) and the label."""
        with self._connect() as conn:
            return queries.labelled_answers(conn, model_version)

    def unlabelled_ids(self, model_version: str, limit: int, seed: int = 0) -> list[str]:
        """Up to ``limit`` request ids of ``model_version`` without feedback, a seeded uniform sample (the
        labels the monitor asks for: a uniform sample keeps the few-label certificate about all traffic)."""
        with self._connect() as conn:
            return queries.unlabelled_ids(conn, model_version, limit, seed)

    def request_ids(self) -> set[str]:
        with self._connect() as conn:
            return queries.request_ids(conn)

    def count_impossible_labels(self) -> int:
        """Stored labels outside the answering model's classes (skipped by every reader)."""
        with self._connect() as conn:
            return queries.count_impossible_labels(conn)

    def get_request(self, request_id: str) -> dict[str, Any] | None:
        with self._connect() as conn:
            return queries.get_request(conn, request_id)

    def get_feedback(self, request_id: str) -> int | None:
        with self._connect() as conn:
            return queries.get_feedback(conn, request_id)

    def get_input(self, request_id: str) -> np.ndarray | None:
        with self._connect() as conn:
            return queries.get_input(conn, request_id)

    def recent_confidences(
        self,
        last: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        model_version: str | None = None,
    ) -> ConfidenceWindow:
        """:func:`pcee.traffic.queries.recent_confidences`."""
        with self._connect() as conn:
            return queries.recent_confidences(conn, last, since, until, model_version)

    def labelled_inputs(
        self, since: datetime | None = None, until: datetime | None = None, last: int | None = None
    ) -> LabelledInputs:
        """:func:`pcee.traffic.queries.labelled_inputs`."""
        with self._connect() as conn:
            return queries.labelled_inputs(conn, since, until, last)

    def selective_window(
        self,
        last: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        model_version: str | None = None,
    ) -> SelectiveSummary:
        """:func:`pcee.traffic.queries.selective_window`."""
        with self._connect() as conn:
            return queries.selective_window(conn, last, since, until, model_version)

    def shadow_rows(
        self, since: datetime | None = None, until: datetime | None = None, last: int | None = None
    ) -> ShadowInputs:
        """:func:`pcee.traffic.queries.shadow_rows`."""
        with self._connect() as conn:
            return queries.shadow_rows(conn, since, until, last)

    def journal_mode(self) -> str | None:
        """SQLite's journal mode ('wal' when durable logging is on); None for other databases."""
        if not self.is_sqlite:
            return None
        with self._connect() as conn:
            return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()).lower()

    def dispose(self) -> None:
        """Stop the drain thread, commit what the journal holds, and close every connection."""
        try:
            self.writer.close()
        finally:
            self.engine.dispose()

"""The traffic store's journal (issue 14): an answered row is durable once ``log_requests`` returns,
every reader in any process sees it, a writer killed before its drain loses nothing, a torn record
is skipped, a replayed drain adds nothing, and a failed append raises and leaves the store working."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pcee.settings import Settings
from pcee.traffic.journal import RowJournal
from pcee.traffic.store import TrafficStore
from tests.traffic.test_store_writes import _rec


def _url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'traffic.db'}"


def _ids_in_the_database(tmp_path) -> set[str]:
    """The rows SQLite holds, read by the driver alone (no drain of the journal)."""
    with sqlite3.connect(tmp_path / "traffic.db") as db:
        return {row[0] for row in db.execute("SELECT id FROM requests")}


def test_the_journal_is_the_default_and_lies_beside_the_database(tmp_path, monkeypatch):
    store = TrafficStore(_url(tmp_path))
    assert store.journal is not None and store.journal.path == tmp_path / "traffic.db-rows.journal"
    assert store.journal.fsync is False  # NORMAL: durable against the process dying, like the WAL
    store.dispose()
    full = TrafficStore(_url(tmp_path), synchronous="FULL")  # power-loss durability: fsync every append
    assert full.journal is not None and full.journal.fsync is True
    full.dispose()
    monkeypatch.setenv("PCEE_TRAFFIC_JOURNAL", "false")
    for store in (
        TrafficStore.from_settings(Settings(), _url(tmp_path)),
        TrafficStore("sqlite:///:memory:", journal=False),
    ):
        assert store.journal is None
        store.dispose()


def test_a_row_is_in_the_journal_on_return_and_every_reader_sees_it(tmp_path):
    writer = TrafficStore(_url(tmp_path))
    recs = [_rec(i, input=np.full((1, 2, 2), i, np.float32) if i == 1 else None) for i in range(3)]
    assert writer.log_requests(recs) == 3
    assert writer.journal is not None and writer.journal.pending()
    reader = TrafficStore(_url(tmp_path))  # another engine: another process's view
    assert reader.request_ids() == {r.id for r in recs}  # a read drains first
    assert np.array_equal(reader.get_input(recs[1].id), recs[1].input)
    assert not writer.journal.pending() and _ids_in_the_database(tmp_path) == {r.id for r in recs}
    reader.dispose()
    writer.dispose()


def test_the_drain_thread_commits_without_any_read(tmp_path):
    store = TrafficStore(_url(tmp_path))
    recs = [_rec(i) for i in range(5)]
    for r in recs:
        store.log_requests([r])
    deadline = time.monotonic() + 10
    while _ids_in_the_database(tmp_path) != {r.id for r in recs}:
        assert time.monotonic() < deadline, "the drain thread did not commit the journal"
        time.sleep(0.02)
    assert store.journal is not None and not store.journal.pending()
    store.dispose()


def test_a_writer_killed_before_its_drain_loses_no_row(tmp_path):
    """``kill -9`` right after ``log_requests`` returned: the next reader commits the orphaned journal."""
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        import pcee.traffic.store
        from pcee.traffic.store import TrafficStore
        from tests.traffic.test_store_writes import _rec
        pcee.traffic.store.JOURNAL_DRAIN_DELAY_S = 3600  # the kill always comes before the drain
        store = TrafficStore({_url(tmp_path)!r})
        recs = [_rec(i) for i in range(4)]
        store.log_requests(recs[:2])
        store.log_requests(recs[2:])
        print(" ".join(r.id for r in recs), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # before the drain thread's delay is over
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    ids = set(proc.stdout.split())
    assert len(ids) == 4
    assert _ids_in_the_database(tmp_path) == set()  # nothing was committed: all of it is in the journal
    store = TrafficStore(_url(tmp_path))  # opening the store drains it
    assert _ids_in_the_database(tmp_path) == ids and store.request_ids() == ids
    store.dispose()


def test_a_torn_record_is_skipped_and_the_records_after_it_are_kept(tmp_path):
    store = TrafficStore(_url(tmp_path))
    first, later = _rec(1), _rec(2)
    store.log_requests([first])
    assert store.journal is not None
    with open(store.journal.path, "ab") as f:  # a writer that died inside write()
        f.write(b'\n{"requests": [["torn", "2026-01-01 00:00')
    store.log_requests([later])
    assert store.request_ids() == {first.id, later.id}
    assert store.skipped_records == 1 and not store.journal.pending()
    store.dispose()


def test_a_replayed_drain_adds_nothing(tmp_path):
    """A drain that committed and died before truncating: the next one commits the same records again."""
    store = TrafficStore(_url(tmp_path))
    recs = [_rec(i, input=np.zeros((1, 2, 2), np.float32)) for i in range(3)]
    store.log_requests(recs)
    assert store.journal is not None
    records = [line for line in store.journal.path.read_bytes().split(b"\n") if line]
    store.writer.commit_records(records)  # the first drain's commit, without its truncation
    assert store.count_requests() == 3  # the drain of this read replays the same records
    store.dispose()


def test_a_failed_append_raises_and_the_store_goes_on(tmp_path):
    store = TrafficStore(_url(tmp_path))
    assert store.journal is not None
    store.journal.path.mkdir()  # the journal cannot be opened
    with pytest.raises(OSError):
        store.log_requests([_rec(1)])
    assert store.request_ids() == set()  # a directory is not a pending journal
    store.journal.path.rmdir()
    ok = _rec(2)
    assert store.log_requests([ok]) == 1
    assert store.request_ids() == {ok.id}
    store.dispose()


def test_a_failed_commit_leaves_the_records_in_the_journal(tmp_path):
    journal = RowJournal(tmp_path / "j")
    journal.append(b"one")
    journal.append(b"two")

    def failing(records: list[bytes]) -> None:
        raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError):
        journal.drain(failing)
    got: list[bytes] = []
    assert journal.drain(got.extend) == 2 and got == [b"one", b"two"]
    assert not journal.pending() and journal.drain(got.extend) == 0
    with pytest.raises(ValueError, match="newline"):
        journal.append(b"a\nb")
    journal.close()


def test_a_row_the_database_would_refuse_fails_the_call_not_the_drain(tmp_path):
    store = TrafficStore(_url(tmp_path))
    bad = _rec(1, confidence=float("nan"))  # NOT NULL column; SQLite stores NaN as NULL
    with pytest.raises(ValueError, match="confidence is nan"):
        store.log_requests([_rec(0), bad])
    assert store.journal is not None and not store.journal.pending()  # nothing of that call was logged
    assert store.request_ids() == set()
    store.dispose()


def test_a_refused_journal_row_does_not_block_the_rows_after_it(tmp_path):
    """A record the database refuses (written by a bug or another version) is skipped (INSERT OR
    IGNORE), the rest committed."""
    store = TrafficStore(_url(tmp_path))
    good = _rec(1)
    store.log_requests([good])
    assert store.journal is not None
    row = store.journal.path.read_bytes().strip().split(b"\n")[-1]
    poisoned = row.replace(good.id.encode(), b"poisoned-id").replace(b'"pcee"', b"null")  # policy NOT NULL
    assert poisoned != row
    store.journal.append(poisoned)
    later = _rec(2)
    store.log_requests([later])
    assert store.request_ids() == {good.id, later.id}
    assert not store.journal.pending()
    store.dispose()

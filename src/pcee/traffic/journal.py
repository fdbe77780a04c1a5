"""An append-only file in front of the SQLite traffic store: an answer waits for one ``write()``, not a commit.

Why: the service logs a request's row before it answers it (:mod:`pcee.serving.batcher`). A SQLite
commit costs ~0.06 ms on its own and about twice that between two model runs on the serving path
(the two evict each other from the CPU caches), which at concurrency 1 was 5–6 % of the p50 an
HTTP client sees. Appending one record to a file costs ~0.01 ms and is exactly as durable against
the process dying (``kill -9``, OOM, a crash) as a WAL commit with ``synchronous=NORMAL``: once
``write()`` returns, the bytes are the kernel's. With ``fsync=True`` (the store's ``FULL`` and
``EXTRA`` modes) every append is also fsynced, for power-loss durability.

The store *drains* the journal into SQLite: a background thread of the writing process does it a
little later, in one transaction for every record appended since (cheaper per row than a commit per
batch), and every read of the store drains first, in any process, so a reader sees every row that
was answered before the read began, including those of a writer that was killed before its drain.

Format: each append is ``b"\\n" + payload + b"\\n"``. A writer killed inside ``write()`` leaves a torn
record; the leading newline keeps the next record on a line of its own, and a line that does not
parse is skipped at the drain (its request was never answered: the answer waits for ``write()``).

Concurrency: appends and drains hold a lock for the threads of one process and ``flock`` on the file
for processes. A drain hands every complete record to a callback that commits them, then truncates
the file. The callback must be idempotent (the store inserts with ``INSERT OR IGNORE`` on the
request id): a drain that committed and died before truncating is replayed by the next one. The
file is never unlinked, since another process may hold it open.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path


class RowJournal:
    """Append records to ``path``; :meth:`drain` hands the complete ones to a commit callback, then empties it.

    Parameters
    ----------
    path : the journal file (created on the first append).
    fsync : fsync every append and every truncation (power-loss durability).
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        return self._fd

    def append(self, payload: bytes) -> None:
        """Append one record (``payload`` must not contain a newline). Raises OSError, and then the
        record may be torn: it is skipped at the drain."""
        if b"\n" in payload:
            raise ValueError("a journal record must not contain a newline")
        data = memoryview(b"\n" + payload + b"\n")
        with self._lock:
            fd = self._file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                while data:  # a regular file takes it in one write unless the disk is full
                    data = data[os.write(fd, data) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def pending(self) -> bool:
        """Whether the file holds anything (one ``stat``; no lock)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size > 0

    def drain(self, commit: Callable[[list[bytes]], None]) -> int:
        """Hand every complete record to ``commit``, then empty the file; returns the record count.

        If ``commit`` raises, the file is left as it was (the records are drained later) and the
        error propagates."""
        if not self.pending():
            return 0
        with self._lock:
            fd = self._file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                chunks, offset = [], 0
                while offset < size:
                    chunk = os.pread(fd, size - offset, offset)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    offset += len(chunk)
                records = [line for line in b"".join(chunks).split(b"\n") if line]
                if records:
                    commit(records)
                os.ftruncate(fd, 0)
                if self.fsync:
                    os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        return len(records)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

"""Fixtures for the scale-out tests: a real PostgreSQL server (:mod:`pcee_dev.postgres`) on a
free port, its files in a temporary directory the server's OS user can reach, stopped at the end.

Tests that use ``postgres_server`` should carry ``pytest.mark.xdist_group("postgres")`` so that
under xdist they share one worker and thus one server."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcee_dev.postgres import PostgresServer
from pcee_dev.proc import free_port as free_port  # re-exported for the scale tests


def traversable_tmpdir(prefix: str) -> Path:
    """A fresh directory under the system temp dir, mode 0755: pytest's tmp dirs are 0700 under
    /tmp/pytest-of-root, which the ``postgres`` OS user (the server runs as it when we are root)
    cannot enter."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running server with the role ``pcee`` and the databases ``pcee_mlflow`` and ``pcee_traffic``;
    ``.port``, ``.sqlalchemy_url(db)``, ``.create_database(name)``, ``.stop()``/``.start()``."""
    root = traversable_tmpdir("pcee-pg-")
    server = PostgresServer(root / "postgres", free_port(), durable=False)  # fsync off: a throwaway server
    try:
        server.start()
        yield server
    finally:
        server.stop(immediate=True)  # no shutdown checkpoint: the files are deleted next
        shutil.rmtree(root, ignore_errors=True)

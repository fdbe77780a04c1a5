"""Where the engines of the scaled-out stack are (README "Scale-out"): the URLs and credentials of
PostgreSQL (:mod:`.postgres`), S3 (:mod:`.s3`) and the Dask scheduler (:mod:`.dask`) that pcee's
clients need. Addresses only: the launchers that start these servers for ``make up`` and the tests
are development tools (``dev/``, package ``pcee_dev``), not part of the library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pcee.stack import postgres

if TYPE_CHECKING:
    from pcee.settings import Settings


def default_traffic_url(settings: Settings) -> str:
    """``PCEE_TRAFFIC_URL``, else with ``PCEE_DB=postgres`` the ``pcee_traffic`` database (its password
    read from the state dir, never passed around), else a SQLite file in the state dir."""
    if settings.traffic_url:
        return settings.traffic_url
    if settings.db == "postgres":
        return postgres.traffic_url(settings)
    return f"sqlite:///{settings.state_dir / 'traffic.db'}"

"""PostgreSQL addresses for the scaled-out stack: the URLs of pcee's two databases and the password
of the local server's login role, read from the state directory. No server is started here (the
development tools' ``pcee_dev.postgres`` runs one for ``make up`` and the tests).

Local server (``PCEE_DB=postgres`` without ``PCEE_POSTGRES_URL``): 127.0.0.1:``PCEE_POSTGRES_PORT``,
role ``pcee``, its password in ``<state_dir>/postgres/password`` (written once, mode 0600, by the
server's first start). Two databases, both owned by ``pcee``: ``pcee_mlflow`` (MLflow's backend
store) and ``pcee_traffic`` (the traffic store); they must not share one (MLflow has its own
``inputs`` table).

Existing server (``PCEE_POSTGRES_URL``, e.g. ``postgresql://user:pw@host:5432/postgres``): the
databases' URLs are that URL with the database replaced.

Standard library only: psycopg is the driver the URLs name, imported by whoever connects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

HOST = "127.0.0.1"
ROLE = "pcee"  # the login role the services use (never the superuser)
MLFLOW_DB = "pcee_mlflow"
TRAFFIC_DB = "pcee_traffic"
DATABASES = (MLFLOW_DB, TRAFFIC_DB)


class PostgresError(RuntimeError):
    """PostgreSQL is missing, down or refused an operation; the message names the URL (password masked) or the log."""


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def _with_scheme(url: str, scheme: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise PostgresError(f"not a PostgreSQL URL: {mask_url(url)} (expected postgresql://user:password@host:port/db)")
    return urlunsplit(parts._replace(scheme=scheme))


def sqlalchemy_url_of(url: str) -> str:
    """A PostgreSQL URL in SQLAlchemy's spelling with the psycopg 3 driver (``postgresql+psycopg://``)."""
    return _with_scheme(url, "postgresql+psycopg")


def libpq_url_of(url: str) -> str:
    """A PostgreSQL URL as libpq/psycopg take it (``postgresql://``)."""
    return _with_scheme(url, "postgresql")


def with_database(url: str, database: str) -> str:
    """``url`` pointing at ``database`` instead of the one it names."""
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


def password_path(state_dir: str | Path) -> Path:
    """Where the local server's login password lives: ``<state_dir>/postgres/password``."""
    return Path(state_dir) / "postgres" / "password"


def read_password(state_dir: str | Path) -> str:
    """The local server's login password. Never creates one: a missing file means this is not the
    state directory ``make up`` used, and a new password would only fail to log in."""
    path = password_path(state_dir)
    try:
        pw = path.read_text().strip()
    except FileNotFoundError:
        raise PostgresError(
            f"no PostgreSQL password at {path}: PCEE_STATE_DIR={state_dir} is not the state directory of the "
            "`make up` that started the server (set PCEE_STATE_DIR to it, or `source <state dir>/env.sh`), "
            "or set PCEE_POSTGRES_URL / PCEE_TRAFFIC_URL to a server of your own"
        ) from None
    if not pw:
        raise PostgresError(f"the password file {path} is empty: delete it and the data directory next to it")
    return pw


def local_url(settings: Any, database: str) -> str:
    """SQLAlchemy URL of ``database`` on the local server ``make up`` runs, as the ``pcee`` role."""
    pw = quote(read_password(settings.state_dir), safe="")
    return f"postgresql+psycopg://{ROLE}:{pw}@{HOST}:{settings.postgres_port}/{database}"


def database_url(settings: Any, database: str) -> str:
    """SQLAlchemy URL of ``database`` on ``PCEE_POSTGRES_URL``'s server, else on the local one."""
    if settings.postgres_url:
        return with_database(sqlalchemy_url_of(settings.postgres_url), database)
    return local_url(settings, database)


def mlflow_backend_uri(settings: Any) -> str:
    """MLflow's backend store for ``PCEE_DB=postgres``: the ``pcee_mlflow`` database."""
    return database_url(settings, MLFLOW_DB)


def traffic_url(settings: Any) -> str:
    """The traffic store for ``PCEE_DB=postgres``: the ``pcee_traffic`` database."""
    return database_url(settings, TRAFFIC_DB)

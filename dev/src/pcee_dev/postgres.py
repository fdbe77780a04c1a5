"""The local PostgreSQL server of the scaled-out stack (development tools: ``make up``, tests,
benchmarks); the library reads only its addresses (:mod:`pcee.stack.postgres`, re-exported here).

Local server (``PCEE_DB=postgres`` without ``PCEE_POSTGRES_URL``): Debian's ``postgresql`` binaries
(``scripts/ensure_postgres.sh`` installs them), everything under ``<state_dir>/postgres/``:
``data/`` (initdb'd once, owned by the server's OS user, mode 0700), ``run/`` (its Unix socket),
``password`` (the generated password of the login role ``pcee``, mode 0600). The server listens on
127.0.0.1 only (``PCEE_POSTGRES_PORT``, default 5432). TCP logins need a password (scram-sha-256);
the superuser ``postgres`` has none and logs in only through the Unix socket, whose directory only
the server's OS user (and root) can enter. PostgreSQL refuses to run as root: when we are root the
server and initdb run as the Debian ``postgres`` user.

Two databases, both owned by ``pcee``: ``pcee_mlflow`` (MLflow's backend store) and
``pcee_traffic`` (the traffic store). They must not share one: MLflow has its own ``inputs`` table.

Existing server (``PCEE_POSTGRES_URL``, e.g. ``postgresql://user:pw@host:5432/postgres``): the two
databases are created there if missing, and their URLs are that URL with the database replaced.

``python -m pcee_dev.postgres serve --root DIR --port P`` is what ``make up`` runs: initdb if
needed, the server in the foreground, the role and the databases once it accepts connections; on
SIGTERM (``make down``) it asks the server for a *fast* shutdown (SIGTERM alone is PostgreSQL's
"smart" shutdown, which waits for every client, e.g. MLflow's pool, to disconnect).

Standard library and psycopg only.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

# the addresses are the library's (pcee.stack.postgres), re-exported beside the launcher
from pcee.stack.postgres import (
    DATABASES,
    HOST,
    MLFLOW_DB,
    ROLE,
    TRAFFIC_DB,
    PostgresError,
    database_url,
    libpq_url_of,
    mask_url,
    mlflow_backend_uri,
    sqlalchemy_url_of,
    traffic_url,
    with_database,
)
from pcee_dev.proc import tail

__all__ = [
    "DATABASES",
    "HOST",
    "MLFLOW_DB",
    "ROLE",
    "TRAFFIC_DB",
    "PostgresError",
    "database_url",
    "libpq_url_of",
    "mask_url",
    "mlflow_backend_uri",
    "sqlalchemy_url_of",
    "traffic_url",
    "with_database",
    "PostgresServer",
    "ensure_databases",
    "find_bin_dir",
    "local_server",
    "read_or_create_password",
    "serve",
]

SUPERUSER = "postgres"  # initdb's bootstrap superuser: Unix socket only
OS_USER_WHEN_ROOT = "postgres"  # Debian's postgresql package creates it


def ensure_databases(url: str, databases: tuple[str, ...] = DATABASES, timeout_s: float = 5.0) -> list[str]:
    """Create ``databases`` on the server of ``url`` where missing; returns the ones created.

    Raises :class:`PostgresError` naming ``url`` (password masked) when the server cannot be
    reached or refuses; two callers at once are fine (a database the other created first is not an
    error)."""
    created = []
    try:
        with psycopg.connect(libpq_url_of(url), autocommit=True, connect_timeout=max(1, int(timeout_s))) as conn:
            for db in databases:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                    continue
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
                    created.append(db)
                except (pg_errors.DuplicateDatabase, pg_errors.UniqueViolation):
                    pass  # another process created it first
    except psycopg.Error as err:
        raise PostgresError(
            f"PostgreSQL server at {mask_url(url)} is not usable: {_first_line(err)} "
            f"(start it, or fix PCEE_POSTGRES_URL; it needs the right to CREATE DATABASE {', '.join(databases)})"
        ) from None
    return created


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- the password --------------------------------------------------------------------------------


def read_or_create_password(path: Path) -> str:
    """The password in ``path``; generated (and written with mode 0600) on first use.

    Exclusive create: two processes asking at once get the same password."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the creator may not have written it yet
            pw = path.read_text().strip()
            if pw:
                return pw
            time.sleep(0.02)
        raise PostgresError(f"the password file {path} is empty: delete it (and the data dir next to it)") from None
    pw = secrets.token_urlsafe(24)  # URL-safe: goes into connection URLs as is
    with os.fdopen(fd, "w") as f:
        f.write(pw + "\n")
    return pw


# --- binaries ------------------------------------------------------------------------------------


def find_bin_dir() -> Path:
    """The directory of the newest installed PostgreSQL server (``/usr/lib/postgresql/<v>/bin``)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.parent.name)] or [0],
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    raise PostgresError(
        "no PostgreSQL server binary (/usr/lib/postgresql/*/bin/postgres): run `make setup` "
        "(scripts/ensure_postgres.sh installs Debian's postgresql) or set PCEE_POSTGRES_URL to an existing server"
    )


# --- a local server ------------------------------------------------------------------------------


class PostgresServer:
    """A PostgreSQL server whose files all live under ``root`` (see the module docstring).

    ``root`` and its parents must be traversable by the server's OS user (``postgres`` when we
    are root); ``root`` holds ``data/``, ``run/``, ``password`` and, for :meth:`start`, ``postgres.log``.
    """

    def __init__(
        self,
        root: Path,
        port: int = 5432,
        host: str = HOST,
        os_user: str | None = None,
        log_path: Path | None = None,
        durable: bool = True,
    ) -> None:
        self.root = Path(root).resolve()
        self.port = int(port)
        self.host = host
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "run"
        self.password_file = self.root / "password"
        self.log_path = Path(log_path) if log_path else self.root / "postgres.log"  # where its output goes
        # PostgreSQL refuses to run as root: initdb and the server run as the Debian postgres user
        self.os_user = os_user if os_user is not None else (OS_USER_WHEN_ROOT if os.geteuid() == 0 else None)
        # durable=False (tests only): no fsync, so initdb, checkpoints and shutdown cost no disk syncs
        self.durable = durable
        self._proc: subprocess.Popen[Any] | None = None

    # -- addresses
    @property
    def password(self) -> str:
        return read_or_create_password(self.password_file)

    def url(self, database: str) -> str:
        """libpq URL of ``database`` as the ``pcee`` role."""
        return f"postgresql://{ROLE}:{quote(self.password, safe='')}@{self.host}:{self.port}/{database}"

    def sqlalchemy_url(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3) of ``database`` as the ``pcee`` role."""
        return sqlalchemy_url_of(self.url(database))

    # -- files
    def _as_user(self) -> dict[str, Any]:
        """Popen arguments that run a command as the server's OS user."""
        if self.os_user is None:
            return {}
        return {"user": self.os_user, "group": self.os_user, "extra_groups": []}

    def _chown(self, path: Path) -> None:
        if self.os_user is not None:
            shutil.chown(path, self.os_user, self.os_user)

    def _check_traversable(self) -> None:
        """The server's OS user must be able to walk down to ``root`` (pytest's 0700 tmp dirs, /root)."""
        if self.os_user is None:
            return
        import pwd

        uid = pwd.getpwnam(self.os_user).pw_uid
        for d in [*reversed(self.root.parents), self.root]:
            st = d.stat()
            if st.st_uid != uid and not st.st_mode & 0o001:
                raise PostgresError(
                    f"{d} (mode {st.st_mode & 0o777:o}) is not traversable by the OS user {self.os_user!r} that "
                    f"runs PostgreSQL; put the state dir elsewhere or `chmod o+x {d}`"
                )

    def init(self) -> bool:
        """initdb once (returns whether it ran). initdb writes a temporary directory that is then
        renamed into place, so a crash or a second process never leaves a half-made ``data/``."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_traversable()
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.socket_dir)
        self.socket_dir.chmod(0o700)
        if (self.data_dir / "PG_VERSION").is_file():
            return False
        tmp = self.root / f".data-initdb-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        self._chown(tmp)
        cmd = [
            str(find_bin_dir() / "initdb"),
            "-D",
            str(tmp),
            "-U",
            SUPERUSER,
            "--auth-local=trust",  # the socket dir is 0700: only the server's OS user and root get in
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            *([] if self.durable else ["--no-sync"]),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root, **self._as_user())
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PostgresError(
                f"initdb of {self.data_dir} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        try:
            tmp.rename(self.data_dir)
        except OSError:  # another process initialised it first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (self.data_dir / "PG_VERSION").is_file():
                raise
            return False
        return True

    def command(self) -> list[str]:
        """The server in the foreground (run it as :attr:`os_user`; :meth:`popen` does)."""
        return [
            str(find_bin_dir() / "postgres"),
            "-D",
            str(self.data_dir),
            "-k",
            str(self.socket_dir),
            "-h",
            self.host,
            "-p",
            str(self.port),
            *([] if self.durable else ["-c", "fsync=off", "-c", "full_page_writes=off"]),
        ]

    def popen(self, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start the server process (after :meth:`init`) as the right OS user; ``kwargs`` go to Popen."""
        return subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, cwd=self.root, **self._as_user(), **kwargs)

    # -- connections
    def admin_connect(self, dbname: str = "postgres", timeout_s: float = 2.0) -> psycopg.Connection[Any]:
        """The superuser over the Unix socket (autocommit)."""
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            autocommit=True,
            connect_timeout=max(1, int(timeout_s)),
        )

    def is_ready(self) -> bool:
        """Whether the server accepts connections (as the superuser, through the socket)."""
        try:
            with self.admin_connect() as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def accepts_role(self, database: str = MLFLOW_DB) -> bool:
        """Whether ``pcee`` can log into ``database`` over TCP: the server is up *and* set up."""
        try:
            with psycopg.connect(self.url(database), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def setup(self) -> None:
        """Create (or re-password) the role ``pcee`` and its databases; idempotent, race-free."""
        pw = self.password
        with self.admin_connect(timeout_s=5) as conn:
            # the statements below carry the password: a failing one must not be copied into the log
            conn.execute("SET log_min_error_statement = panic")
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone() is not None
            try:
                if not exists:
                    conn.execute(
                        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(pw))
                    )
            except (pg_errors.DuplicateObject, pg_errors.UniqueViolation):
                exists = True  # another process created it first
            if exists:  # make its password the one in the state dir (the source of truth)
                conn.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(pw)))
            for db in DATABASES:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                    continue
                try:
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(ROLE))
                    )
                except (pg_errors.DuplicateDatabase, pg_errors.UniqueViolation):
                    pass

    def create_database(self, name: str) -> str:
        """Create database ``name`` owned by ``pcee`` if missing (tests: one per test); its SQLAlchemy URL."""
        self.password  # noqa: B018 - the role's password exists before the role
        with self.admin_connect(timeout_s=5) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                try:
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(ROLE))
                    )
                except (pg_errors.DuplicateDatabase, pg_errors.UniqueViolation):
                    pass
        return self.sqlalchemy_url(name)

    def wait_ready(self, proc: subprocess.Popen[Any] | None, timeout_s: float = 60.0) -> None:
        """Poll until the server accepts connections; fail naming the log if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if proc is not None and proc.poll() is not None:
                raise PostgresError(
                    f"PostgreSQL on {self.host}:{self.port} exited with code {proc.returncode} while starting "
                    f"(data {self.data_dir}); see its log {self.log_path}:\n{tail(self.log_path, 20)}"
                )
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"PostgreSQL on {self.host}:{self.port} not ready after {timeout_s:.0f}s; see its log {self.log_path}"
                )
            time.sleep(0.1)

    # -- lifecycle (tests; `make up` runs :func:`serve` instead)
    def start(self, timeout_s: float = 60.0) -> None:
        """init (once), start the server in the background (own session, log in :attr:`log_path`),
        wait until it accepts connections, set up the role and databases."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self.init()
        with open(self.log_path, "ab") as log:
            self._proc = self.popen(stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready(self._proc, timeout_s)
            self.setup()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 30.0, immediate: bool = False) -> None:
        """Fast shutdown (SIGINT: disconnect clients, checkpoint, exit), or with ``immediate`` no
        checkpoint (SIGQUIT: a throwaway server); SIGKILL after ``timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop_orphan(self, timeout_s: float = 30.0) -> None:
        """Stop a server of this data directory left running without us (this wrapper was killed on
        its own, so supervisord's restart would otherwise fail on its lock file): fast shutdown."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return  # no server, or its lock file is stale: PostgreSQL itself handles that
        if b"postgres" not in cmdline or str(self.data_dir).encode() not in cmdline:
            return
        print(f"postgres: stopping the server (pid {pid}) left running on {self.data_dir}", flush=True)
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


# --- what make up and the services use ----------------------------------------------------------


def local_server(settings: Any) -> PostgresServer:
    """The server ``make up`` starts for ``settings`` (a :class:`pcee.settings.Settings`)."""
    return PostgresServer(Path(settings.state_dir) / "postgres", settings.postgres_port)


def serve(root: Path, port: int, host: str = HOST, log_path: Path | None = None) -> int:
    """Run a local server in the foreground until SIGTERM/SIGINT (``make up``'s command); its output
    goes to our stdout, which ``make up`` sends to ``log_path`` (named in error messages)."""
    server = PostgresServer(root, port, host, log_path=log_path)
    try:
        if server.init():
            print(f"postgres: initialised {server.data_dir}", flush=True)
    except PostgresError as err:
        print(f"postgres: {err}", file=sys.stderr, flush=True)
        return 2
    server.stop_orphan()
    # same process group as us: `make down` SIGTERMs both; we escalate to a fast shutdown
    proc = server.popen()

    def fast_shutdown(_sig: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, fast_shutdown)
    signal.signal(signal.SIGINT, fast_shutdown)
    try:
        server.wait_ready(proc)
        server.setup()
    except (PostgresError, psycopg.Error) as err:
        print(
            f"postgres: failed to start on {host}:{port} (data {server.data_dir}): {err}", file=sys.stderr, flush=True
        )
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait()
        return 1
    print(f"postgres: ready on {host}:{port}, databases {', '.join(DATABASES)}, role {ROLE}", flush=True)
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pcee's local PostgreSQL server (make up)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="initdb if needed, run the server in the foreground, create role and databases")
    p.add_argument("--root", type=Path, required=True, help="<state_dir>/postgres")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default=HOST)
    p.add_argument("--log", type=Path, default=None, help="where our output goes (named in error messages)")
    args = parser.parse_args(argv)
    return serve(args.root, args.port, args.host, args.log)


if __name__ == "__main__":
    sys.exit(main())

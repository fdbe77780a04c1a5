"""DVC edge: version the prepared data snapshot, push it to the remote, read its md5.

Every DVC command goes through :func:`run_dvc`, which holds a process-wide file lock (under the
state dir) so that no two DVC commands ever run at the same time (DVC's own repo lock would
otherwise make the second one fail). The default remote is a local directory under the state
dir, configured in ``.dvc/config.local`` (machine-specific, not committed); ``PCEE_DVC_REMOTE_URL``
(e.g. ``s3://bucket/pcee``) selects another one. With ``PCEE_ARTIFACTS=s3`` the default is
``s3://<PCEE_S3_BUCKET>/dvc`` on the S3 endpoint of :mod:`pcee.stack.s3` (its ``endpointurl`` goes in
``.dvc/config.local``, its credentials in DVC's environment, never in a file of the project).

:func:`directory_md5` computes DVC's directory hash without running DVC (for snapshots outside
the repository, and to check ``data.dvc``): the md5 of the JSON list of {md5, relpath} of the
files, sorted by relpath, with the suffix ``.dir``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from pcee.settings import Settings
from pcee.stack import s3

REMOTE_NAME = "pcee"
_thread_lock = threading.Lock()


def project_dir(settings: Settings | None = None) -> Path:
    """The DVC/git project the pipeline versions data in: ``PCEE_PROJECT_DIR`` or the current dir."""
    return (settings or Settings()).project_dir


def resolve_data_dir(data_dir: str | os.PathLike, settings: Settings | None = None) -> Path:
    """A snapshot path: absolute as given, relative ones under :func:`project_dir`."""
    path = Path(data_dir)
    return (path if path.is_absolute() else project_dir(settings) / path).resolve()


@contextlib.contextmanager
def dvc_lock(state_dir: Path, timeout: float = 600.0) -> Iterator[None]:
    """Exclusive lock across threads and processes sharing ``state_dir``."""
    path = state_dir / "locks" / "dvc.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock, open(path, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout:.0f}s for the DVC lock {path}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dvc_env(settings: Settings) -> dict[str, str]:
    """DVC's environment: this process's (a child process of it), quiet, with the S3 credentials."""
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DVC_SITE_CACHE_DIR", str(settings.state_dir / "dvc-site-cache"))
    if settings.artifacts == "s3":
        env.update(s3.client_env(settings, env))  # AWS_* credentials: the same path DVC takes on AWS
    return env


def run_dvc(
    args: list[str], repo: str | os.PathLike | None = None, check: bool = True, settings: Settings | None = None
) -> subprocess.CompletedProcess:
    """Run ``dvc <args>`` in ``repo`` under the DVC lock; raise with DVC's message on failure."""
    settings = settings or Settings()
    repo = Path(repo) if repo else settings.project_dir
    exe = Path(sys.executable).with_name("dvc")
    cmd = [str(exe) if exe.exists() else "dvc", *args]
    with dvc_lock(settings.state_dir):
        proc = subprocess.run(cmd, cwd=repo, env=dvc_env(settings), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"`dvc {' '.join(args)}` failed in {repo} (exit {proc.returncode}):\n{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def directory_md5(path: str | os.PathLike) -> str:
    """DVC's md5 of a directory (``<hex>.dir``), computed without DVC."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    entries = sorted(
        ({"md5": _file_md5(p), "relpath": p.relative_to(root).as_posix()} for p in root.rglob("*") if p.is_file()),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def read_dvc_md5(dvc_file: str | os.PathLike) -> str:
    """The md5 recorded for the (single) output of a ``.dvc`` file."""
    data = yaml.safe_load(Path(dvc_file).read_text())
    outs = data.get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise ValueError(f"{dvc_file} must have exactly one output with an md5, got {outs}")
    return str(outs[0]["md5"])


def remote_url(settings: Settings) -> str:
    if settings.dvc_remote_url:
        return settings.dvc_remote_url
    if settings.artifacts == "s3":
        return s3.dvc_remote_url(settings)
    return str(settings.state_dir / "dvc-remote")


def ensure_remote(repo: str | os.PathLike | None = None, settings: Settings | None = None) -> str:
    """Configure the default remote in ``.dvc/config.local`` (this machine only); returns its URL."""
    settings = settings or Settings()
    url = remote_url(settings)
    if "://" not in url:
        Path(url).mkdir(parents=True, exist_ok=True)
    run_dvc(["remote", "add", "--local", "--default", "--force", REMOTE_NAME, url], repo, settings=settings)
    if url.startswith("s3://") and settings.artifacts == "s3":
        # the S3 engine's endpoint (local server, MinIO, AWS); plain DVC+AWS otherwise
        endpoint = s3.endpoint_url(settings)
        run_dvc(["remote", "modify", "--local", REMOTE_NAME, "endpointurl", endpoint], repo, settings=settings)
    return url


def version_data(
    data_dir: str | os.PathLike = "data",
    repo: str | os.PathLike | None = None,
    push: bool = True,
    settings: Settings | None = None,
) -> dict[str, str]:
    """Track ``data_dir`` with DVC (``dvc add``), push it to the remote; returns md5 and paths.

    A snapshot outside the DVC repository is not tracked; its md5 is computed the same way.
    """
    settings = settings or Settings()
    repo = Path(repo) if repo else settings.project_dir
    data = Path(data_dir)
    data = (repo / data if not data.is_absolute() else data).resolve()
    if not data.is_dir():
        raise FileNotFoundError(f"data snapshot {data} does not exist (run `pcee data prepare --out {data_dir}`)")
    inside = (repo / ".dvc").is_dir() and data.is_relative_to(repo)
    if not inside:
        return {"md5": directory_md5(data), "path": str(data), "dvc_file": "", "remote": ""}
    rel = data.relative_to(repo).as_posix()
    run_dvc(["add", rel], repo, settings=settings)
    dvc_file = repo / f"{rel}.dvc"
    md5 = read_dvc_md5(dvc_file)
    url = ""
    if push:
        url = ensure_remote(repo, settings)
        run_dvc(["push", str(dvc_file.relative_to(repo))], repo, settings=settings)
    return {"md5": md5, "path": str(data), "dvc_file": str(dvc_file), "remote": url}

"""The one process helper of the development tools: free ports, wait until healthy, stop a process
group, tail a log. Used by the service manager, the engines' launchers, the tests and the benchmarks.

Standard library and httpx only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def consecutive_free_ports(count: int, tries: int = 50) -> list[int]:
    """``count`` consecutive ports free on 127.0.0.1 now (as ``make up`` gives its replicas)."""
    for _ in range(tries):
        base = free_port()
        if base + count - 1 > 65535:
            continue
        try:
            for port in range(base + 1, base + count):
                with socket.socket() as s:
                    s.bind((HOST, port))
        except OSError:
            continue
        return list(range(base, base + count))
    raise RuntimeError(f"no {count} consecutive free ports on {HOST} after {tries} tries")


def tail(path: str | os.PathLike, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or ``(no log)``."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``GET url`` answers 2xx (never raises)."""
    try:
        return httpx.get(url, timeout=timeout).is_success
    except httpx.HTTPError:
        return False


def wait_until(
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: str | os.PathLike | None = None,
    interval: float = 0.2,
) -> float:
    """Poll ``ready()`` until it is true; returns the seconds waited. RuntimeError naming ``what``
    (and the tail of ``log``) when ``proc`` exits first or ``timeout`` passes."""
    t0 = time.monotonic()
    while not ready():
        where = f"; last log lines ({log}):\n{tail(log)}" if log else ""
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with code {proc.returncode} while starting{where}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s{where}")
        time.sleep(interval)
    return time.monotonic() - t0


def spawn(
    cmd: Sequence[str],
    log_path: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start ``cmd`` in its own session (process group), output appended to ``log_path``."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ if env is None else env),
            cwd=cwd,
            start_new_session=True,  # own process group: stop_group takes the whole tree
        )


def stop_group(proc: subprocess.Popen | int, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the process group ``proc`` leads (its own session), SIGKILL after ``timeout``;
    reap it when it is our child. A Popen already reaped is left alone (its PID may be reused)."""
    popen = proc if isinstance(proc, subprocess.Popen) else None
    pid = proc.pid if isinstance(proc, subprocess.Popen) else int(proc)
    if popen is not None and popen.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None and popen.poll() is not None:
            break
        if popen is None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # the leader is gone or stuck: what is left of its group goes too
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(10)


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """Every TCP socket listening in these processes or their descendants: (pid, address, port)."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                procs[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    found = []
    for pid, proc in procs.items():
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return sorted(found)

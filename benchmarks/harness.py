"""What the HTTP benchmarks share: service processes, the load loop, the result cell, request bodies
and the digits bundle. The process helper and the load loop themselves are one each, elsewhere:
:mod:`pcee_dev.proc` (free ports, wait until healthy, stop a process group, tail a log) and
:func:`pcee.traffic.loadgen.closed_loop` (``pcee traffic``'s clients)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.http_clients import Post
from pcee.traffic.loadgen import closed_loop
from pcee_dev.proc import consecutive_free_ports, free_port, http_ok, spawn, stop_group, tail
from pcee_dev.services.manager import QUIET_ENV

__all__ = [
    "QUIET_ENV",
    "Cell",
    "Proc",
    "Processes",
    "build_digits_bundle",
    "consecutive_free_ports",
    "drive",
    "free_port",
    "med",
    "request_bodies",
    "serve_command",
    "stop_on_sigterm",
    "wait_http",
]


# --- service processes ----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    url: str

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)


class Processes:
    """Every process a benchmark starts, each in its own session (process group), so that stopping it
    also stops what it started (``mlflow models serve`` runs uvicorn in a child process)."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.procs: list[Proc] = []

    def start(self, name: str, cmd: list[str], url: str, env: dict[str, str] | None = None) -> Proc:
        popen = spawn(cmd, self.tmp / "logs" / f"{name}.log", {**self.env, **(env or {})}, cwd=self.tmp)
        proc = Proc(name, popen, self.tmp / "logs" / f"{name}.log", url)
        self.procs.append(proc)
        return proc

    def wait_healthy(self, procs: list[Proc], timeout: float) -> None:
        """Block until every one of ``procs`` answers ``GET /health`` with 200 (RuntimeError with the
        log of the one that died or did not come up)."""
        deadline = time.monotonic() + timeout
        pending = list(procs)
        while pending:
            for proc in list(pending):
                if proc.popen.poll() is not None:
                    raise RuntimeError(
                        f"{proc.name} exited with {proc.popen.returncode} before it was healthy:\n{proc.log_tail()}"
                    )
                if http_ok(f"{proc.url}/health"):
                    pending.remove(proc)
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise RuntimeError(f"{names} not healthy after {timeout:.0f} s:\n{pending[0].log_tail()}")
            if pending:
                time.sleep(0.3)

    def stop(self, proc: Proc) -> None:
        if proc in self.procs:
            self.procs.remove(proc)
            stop_group(proc.popen)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGKILL)  # a child left behind in the group (uvicorn under mlflow)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as err:  # keep stopping the others
                print(f"could not stop {proc.name} (pid {proc.popen.pid}): {err}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM becomes KeyboardInterrupt, so the ``finally`` that stops the servers runs."""
    if threading.current_thread() is not threading.main_thread():  # handlers only in the main thread
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def serve_command(
    port: int, traffic_url: str, *source: str, poll_interval_s: float | None = 0.0, host: str = "127.0.0.1"
) -> list[str]:
    """``pcee serve`` on 127.0.0.1:``port`` logging to ``traffic_url``; ``source``: ``"--bundle", DIR``
    or ``"--model-name", NAME``; ``poll_interval_s`` None: the service's default poll."""
    poll = [] if poll_interval_s is None else ["--poll-interval", str(poll_interval_s)]
    return [
        sys.executable,
        "-m",
        "pcee.cli",
        "serve",
        *source,
        "--host",
        host,
        "--port",
        str(port),
        *poll,
        "--traffic-url",
        traffic_url,
    ]


# --- the load loop and its result ---------------------------------------------------------------


@dataclass
class Cell:
    """One timed run (a server at a concurrency): answers, latencies, errors, wall time."""

    server: str = ""
    concurrency: int = 0
    n: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)  # sample index -> answer (kept on request)
    predictions: list[tuple[int, int]] = field(default_factory=list)  # (sample index, prediction)

    def p(self, q: float) -> float:
        """The ``q``-th percentile of the latencies, in ms."""
        return float(np.percentile(self.latencies_s, q) * 1000.0) if self.latencies_s else float("nan")

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else float("nan")


async def drive(
    post: Post,
    transport_errors: tuple[type[BaseException], ...],
    url: str,
    bodies: list[bytes],
    n: int,
    concurrency: int,
    results_key: str | None = "results",
    keep: bool = False,
    start: int = 0,
    server: str = "",
) -> Cell:
    """``n`` requests (samples ``start``, ``start + 1``, ... cycling over ``bodies``) from
    ``concurrency`` closed-loop clients on one session's ``post``. With ``results_key``, each answer
    must hold exactly one result under it (its prediction is kept; the whole answer with ``keep``)."""
    cell = Cell(server, concurrency, n)

    async def step(i: int) -> None:
        k = (start + i) % len(bodies)
        t0 = time.perf_counter()
        try:
            r = await post(url, bodies[k])
        except transport_errors as err:
            cell.errors += 1
            cell.error_kinds[type(err).__name__] += 1
            return
        dt = time.perf_counter() - t0
        if r.status != 200:
            cell.errors += 1
            cell.error_kinds[f"HTTP {r.status}: {r.body[:120].decode(errors='replace')}"] += 1
            return
        if results_key is not None:
            try:
                (answer,) = json.loads(r.body)[results_key]
            except (ValueError, KeyError, TypeError) as err:
                cell.errors += 1
                cell.error_kinds[f"bad answer: {type(err).__name__}"] += 1
                return
            cell.predictions.append((k, int(answer["prediction"])))
            if keep:
                cell.answers[k] = answer
        cell.ok += 1
        cell.latencies_s.append(dt)

    cell.wall_s = await closed_loop(n, concurrency, step)
    return cell


def med(values: list[float]) -> float:
    """The median of the finite values (NaN when there is none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else float("nan")


# --- requests and the model ---------------------------------------------------------------------


def request_bodies(x: np.ndarray, list_of_one: bool = False) -> list[bytes]:
    """One pre-serialised JSON body per sample (the client must measure the servers, not
    json.dumps), pixels rounded to 6 decimals: ``{"inputs": sample}``, or with ``list_of_one``
    ``{"inputs": [sample]}`` (what ``mlflow models serve`` also accepts)."""
    if list_of_one:
        return [json.dumps({"inputs": [np.round(xi, 6).tolist()]}).encode() for xi in x]
    return [f'{{"inputs": {np.round(xi, 6).tolist()}}}'.encode() for xi in x]


def build_digits_bundle(
    out: Path,
    delta: float = 0.5,
    epochs: int = 0,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """A small-cnn on the bundled digits (``epochs`` of joint training, 0: its seeded random
    initialisation) with a PCEE policy at ``delta`` fitted on the validation split, saved to ``out``."""
    import torch

    from pcee.bundle import ModelBundle
    from pcee.data.datasets import load_dataset
    from pcee.models.flops import measure_exit_flops
    from pcee.models.registry import build_model
    from pcee.policies.registry import build_policy
    from pcee.training.trainer import seed_everything

    splits = load_dataset("digits", seed=0)
    seed_everything(seed)
    model = build_model("small-cnn")
    if epochs > 0:
        from pcee.training.config import TrainConfig
        from pcee.training.trainer import train_model

        if progress is not None:
            progress(f"digits: training small-cnn {epochs} epoch(s) (joint)")
        train_model(model, splits, TrainConfig(regime="joint", epochs=epochs, seed=seed), progress=False)
    model.eval()
    with torch.inference_mode():
        logits = torch.stack(model(torch.as_tensor(splits.val.x)), dim=1).numpy()
    flops = measure_exit_flops(model, splits.input_shape)
    policy = build_policy("pcee", delta=delta, min_count=1).fit(logits, splits.val.y, flops)
    bundle_meta = {"dataset": "digits", "input_shape": list(splits.input_shape), **(meta or {})}
    ModelBundle(model, policy, flops, bundle_meta).save(out)
    return out


def wait_http(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait until ``GET url`` answers 2xx (RuntimeError with the log's tail if ``proc`` exits first)."""
    from pcee_dev.proc import wait_until

    wait_until(lambda: http_ok(url, timeout=1.0), timeout, url, proc=proc, log=log)

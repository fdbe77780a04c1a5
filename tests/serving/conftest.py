"""Fixtures for serving tests: a real bundle (tiny small-cnn + fitted PCEE policy) and a real
uvicorn server in a subprocess on a free port, with its traffic store in a tmp directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from pcee.traffic.store import TrafficStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bundle(
    out_dir: Path, seed: int = 0, delta: float = 0.5, meta_extra: dict | None = None, logit_scale: float = 1.0
) -> Path:
    """A real bundle: small-cnn (random weights, seed) + PCEE fitted on its digits val outputs.

    ``meta_extra`` is merged into its meta (e.g. an ``answer_rule``). ``logit_scale`` multiplies the
    exit heads' output layers: a random net's softmax is nearly flat, so every confidence falls in one
    bin and every sample gets the same expected accuracy; sharper logits spread them over the bins."""
    from pcee.bundle import ModelBundle
    from pcee.data.datasets import load_dataset
    from pcee.models.flops import measure_exit_flops
    from pcee.models.registry import build_model
    from pcee.policies.registry import build_policy

    torch.manual_seed(seed)
    model = build_model("small-cnn", widths=(8, 8, 16), downsample=(False, True, False)).eval()
    splits = load_dataset("digits", seed=0)
    if logit_scale != 1.0:
        with torch.no_grad():
            for head in model.exit_heads:
                last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
                last.weight.mul_(logit_scale)
                last.bias.mul_(logit_scale)
    with torch.inference_mode():
        logits = torch.stack(model(torch.as_tensor(splits.val.x)), dim=1).numpy()
    flops = measure_exit_flops(model, splits.input_shape)
    policy = build_policy("pcee", delta=delta, min_count=1).fit(logits, splits.val.y, flops)
    meta = {"dataset": "digits", "input_shape": list(splits.input_shape), "seed": seed, **(meta_extra or {})}
    ModelBundle(model, policy, flops, meta).save(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def digits_test():
    from pcee.data.datasets import load_dataset

    s = load_dataset("digits", seed=0).test
    return s.x.astype(np.float32), s.y


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@dataclass
class ServerProc:
    proc: subprocess.Popen
    url: str
    db_url: str
    log_path: Path

    def store(self) -> TrafficStore:
        return TrafficStore(self.db_url)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_server(
    tmp: Path, *args: str, wait: bool = True, timeout: float = 90.0, env: dict | None = None
) -> ServerProc:
    """``python -m pcee.cli serve --port P ARGS`` with its traffic store under ``tmp``."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{tmp / 'traffic.db'}"
    log_path = tmp / f"server-{port}.log"
    full_env = {**os.environ, "PCEE_STATE_DIR": str(tmp / "state"), "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "pcee.cli", "serve", "--port", str(port), "--traffic-url", db_url, *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProc(proc, f"http://127.0.0.1:{port}", db_url, log_path)
    if wait:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        server.stop()
        raise RuntimeError(f"server not healthy after {timeout} s:\n{server.log()}")
    return server


@pytest.fixture
def server_factory(tmp_path):
    started: list[ServerProc] = []

    def factory(*args: str, sub: str = "srv", **kw) -> ServerProc:
        s = start_server(tmp_path / f"{sub}{len(started)}", *args, **kw)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundle_dir):
    """One shared server for the read-mostly tests of a module."""
    s = start_server(tmp_path_factory.mktemp("server"), "--bundle", str(bundle_dir), "--poll-interval", "0")
    yield s
    s.stop()

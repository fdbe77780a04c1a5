"""The same `pcee train` entry point under `torchrun --nproc_per_node 2` (gloo, CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.train_contract import check_contract

TORCHRUN = Path(sys.executable).with_name("torchrun")
PCEE = Path(sys.executable).with_name("pcee")  # the console script: the same entry point users run


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_write_one_valid_contract(tmp_path, digits):
    assert TORCHRUN.exists(), f"torchrun not found beside {sys.executable}"
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        str(TORCHRUN),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "--no-python",
        str(PCEE),
        "train",
        "--data",
        "digits",
        "--model",
        "small-cnn",
        "--regime",
        "mixed",
        "--epochs",
        "2",
        "--lr",
        "0.1",
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # rank 0 alone reports and writes
    assert proc.stdout.count("wrote outputs") == 1, proc.stdout
    assert "2 process(es)" in proc.stdout
    splits, meta = check_contract(out, digits, world_size=2)
    # each rank took half the data per epoch: the run trained (far above chance at the final exit)
    assert meta["test_accuracy"][-1] > 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]

"""Smoke test of benchmarks/train_speed.py: compare() runs both sides and returns their times (no timing asserted)."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from tests.benchmarks.bench_scripts import BENCHMARKS


def test_compare_times_the_trainer_and_the_plain_loop_side_by_side(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_speed", BENCHMARKS / "train_speed.py")
    speed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_speed", speed)  # its dataclasses look their module up there
    spec.loader.exec_module(speed)
    previous = torch.get_num_threads()
    try:
        res = speed.compare("small-cnn-digits", "cpu", epochs=1, repeats=2, train_options={"threads": 1})
    finally:
        torch.set_num_threads(previous)
    assert res["device"] == "cpu" and res["rows"] > 0 and res["batch_size"] == 64
    assert len(res["wall_s"]["trainer"]) == len(res["cpu_s"]["plain"]) == 2  # the warm-up is not counted
    assert all(t > 0 for side in ("wall_s", "cpu_s") for ts in res[side].values() for t in ts)
    assert math.isfinite(res["ratio"]) and math.isfinite(res["cpu_ratio"])
    assert "small-cnn-digits" in speed.table([res])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):  # asked for CUDA where there is none: a clear usage error
            speed.main(["--device", "cuda"])
        assert "CUDA is not available" in capsys.readouterr().err

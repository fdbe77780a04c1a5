"""A fixed seed gives the same weights bit for bit, whatever the ambient thread settings, and the run
records what decided them (pcee.training.reproducibility; docs/architecture.md, "Reproducible training")."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from pcee.training import TrainConfig, train_model
from pcee.training.reproducibility import training_environment, weights_digest

# a few steps: 1,079 digits rows in batches of 256 is 4 steps per epoch
FEW_STEPS = dict(regime="joint", epochs=2, batch_size=256, lr=0.1, seed=5, threads=1)
REPO = Path(__file__).resolve().parents[2]


# the same run in a fresh process: the seeded digits split, the seeded small CNN, the same config
FRESH_RUN = textwrap.dedent(
    """
    import dataclasses, json, sys, torch
    from pcee.data.datasets import load_dataset
    from pcee.models.registry import build_model, data_overrides
    from pcee.training import TrainConfig, seed_everything, train_model
    from pcee.training.reproducibility import weights_digest
    d = load_dataset("digits", seed=0)
    seed_everything(0)
    model = build_model("small-cnn", **data_overrides("small-cnn", d.input_shape, d.num_classes))
    ambient = torch.get_num_threads()
    history = train_model(model, dataclasses.replace(d, val=None), TrainConfig(**json.loads(sys.argv[1])), progress=False)
    print(json.dumps({"digest": weights_digest(model), "ambient": ambient, "environment": history.environment}))
    """
)


def test_same_seed_same_weights_bit_for_bit_in_a_fresh_process_with_other_thread_settings(digits, small_cnn):
    import dataclasses

    model = small_cnn(seed=0)
    untrained = weights_digest(model)
    history = train_model(model, dataclasses.replace(digits, val=None), TrainConfig(**FEW_STEPS), progress=False)
    assert weights_digest(model) != untrained  # the digest sees the weights
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    env["OMP_NUM_THREADS"] = "2"  # the ambient count torch starts with there: 2 threads, not the pinned 1
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_RUN, json.dumps(FEW_STEPS)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["ambient"] == 2  # the other process really had other thread settings
    assert fresh["digest"] == weights_digest(model)
    assert fresh["environment"] == history.environment and history.environment["threads"] == 1


def test_the_run_pins_threads_records_them_and_restores_the_process(digits, small_cnn):
    import dataclasses

    torch.set_num_threads(2)  # ambient; the conftest puts 1 back afterwards
    config = TrainConfig(**{**FEW_STEPS, "epochs": 1})
    predicted = training_environment(config)
    history = train_model(small_cnn(), dataclasses.replace(digits, val=None), config, progress=False)
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    env = history.environment
    assert env == predicted  # what a cache key computes before training is what the run records
    assert env["threads"] == 1 and env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["deterministic_algorithms"] is True and env["world_size"] == 1
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and len(env["cpu_features"]) == 12
    # None keeps the process's count, and records it: another count is another key
    assert training_environment(TrainConfig(**{**FEW_STEPS, "threads": None}))["threads"] == 2
    # the history travels to the flow (Prefect, Dask) with its record
    assert pickle.loads(pickle.dumps(history)).environment == env

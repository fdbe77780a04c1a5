"""Synthetic multi-exit outputs: later exits are more accurate and more confident."""

from __future__ import annotations

import numpy as np
import pytest


def make_outputs(n=1500, num_exits=4, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    hardness = rng.uniform(0, 1, n)
    strength = np.linspace(0.8, 3.0, num_exits)[None, :] * (1.5 - hardness)[:, None]  # (n, L)
    logits = rng.normal(size=(n, num_exits, num_classes)) * 1.0
    logits[np.arange(n), :, labels] += 2.0 * strength
    flops = np.cumsum(rng.uniform(1.0, 2.0, num_exits)) * 1e6
    return logits.astype(np.float32), labels.astype(np.int64), flops


@pytest.fixture
def outputs():
    return make_outputs()


@pytest.fixture(name="make_outputs")
def make_outputs_fixture():
    return make_outputs

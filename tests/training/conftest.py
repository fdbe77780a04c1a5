"""Fixtures for training tests: the real digits data and small CNN, one thread (2 shared cores)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def digits():
    from pcee.data.datasets import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture
def small_cnn(digits):
    """A fresh, seeded small CNN sized for digits."""
    from pcee.models.registry import build_model, data_overrides
    from pcee.training import seed_everything

    def make(seed: int = 0):
        seed_everything(seed)
        return build_model("small-cnn", **data_overrides("small-cnn", digits.input_shape, digits.num_classes))

    return make

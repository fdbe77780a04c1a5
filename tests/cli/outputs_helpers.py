"""Synthetic outputs-contract data for the CLI and DVC-stage tests."""

from __future__ import annotations

import shutil

import numpy as np

from pcee.outputs import ExitOutputs


def synthetic(n: int, seed: int, num_exits: int = 3, k: int = 4) -> ExitOutputs:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, num_exits, k)).astype(np.float32)
    for level in range(num_exits):
        logits[np.arange(n), level, labels] += rng.normal(1.0 + level, 1.0, n).astype(np.float32)
    return ExitOutputs(logits, labels.astype(np.int64), np.array([1e6, 2.5e6, 4e6]))


def relabelled_copy(src, dst, seed: int = 7):
    """A copy of an outputs directory whose test labels are permuted and partly reassigned."""
    shutil.copytree(src, dst)
    test = ExitOutputs.load(dst / "test.npz")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(test.labels)
    flip = rng.random(labels.size) < 0.3
    labels[flip] = (labels[flip] + 1) % test.num_classes
    assert not np.array_equal(labels, test.labels)
    ExitOutputs(test.logits, labels.astype(np.int64), test.flops).save(dst / "test.npz")
    return dst

"""Synthetic multi-exit outputs (no model needed), shared by the tests of several packages.

:func:`make_graded_outputs`: later exits more accurate and more confident (the policies' and the
operating point's tests).

:func:`make_outputs`, :func:`make_correlated_outputs`: a controllable confidence→accuracy relation.

Each sample has, per exit, a confidence c drawn from a Beta law; the exit predicts the true
label with probability ``clip(c - gap_l, 0, 1)`` and its logits are built so that its max-prob
equals c. ``gap_l = 0`` is calibrated (validation / clean traffic); a positive gap is the
over-confidence a distribution shift causes, largest at early exits.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 10


def make_outputs(n: int, gaps=(0.0, 0.0, 0.0), shapes=((4.0, 1.5), (6.0, 1.2), (9.0, 1.0)), seed: int = 0):
    rng = np.random.default_rng(seed)
    num_exits = len(gaps)
    labels = rng.integers(0, NUM_CLASSES, size=n)
    logits = np.zeros((n, num_exits, NUM_CLASSES), dtype=np.float32)
    for level, (gap, (a, b)) in enumerate(zip(gaps, shapes)):
        c = np.clip(rng.beta(a, b, size=n), 1.0 / NUM_CLASSES + 1e-3, 1 - 1e-4)
        correct = rng.random(n) < np.clip(c - gap, 0.0, 1.0)
        other = (labels + rng.integers(1, NUM_CLASSES, size=n)) % NUM_CLASSES
        pred = np.where(correct, labels, other)
        # softmax max equals c when the predicted logit is log(c (K-1) / (1-c)) and the others 0
        logits[np.arange(n), level, pred] = np.log(c * (NUM_CLASSES - 1) / (1 - c))
    flops = np.cumsum(np.ones(num_exits)) * 1e6
    return logits, labels.astype(np.int64), flops


def make_correlated_outputs(
    n: int,
    gaps=(0.0, 0.0, 0.0),
    shapes=((4.0, 1.5), (6.0, 1.2), (9.0, 1.0)),
    seed: int = 0,
    shared_confusion: bool = True,
):
    """Like :func:`make_outputs`, but the exits of one sample err together, as a network's exits do: one
    draw u per sample decides every exit (exit l is right when u < clip(c_l - gap_l)), and a wrong exit
    names the sample's one confusing class (``shared_confusion=False``: each exit its own wrong class,
    as when a shift garbles the early features)."""
    rng = np.random.default_rng(seed)
    num_exits = len(gaps)
    labels = rng.integers(0, NUM_CLASSES, size=n)
    other = (labels + rng.integers(1, NUM_CLASSES, size=n)) % NUM_CLASSES
    u = rng.random(n)
    logits = np.zeros((n, num_exits, NUM_CLASSES), dtype=np.float32)
    for level, (gap, (a, b)) in enumerate(zip(gaps, shapes)):
        c = np.clip(rng.beta(a, b, size=n), 1.0 / NUM_CLASSES + 1e-3, 1 - 1e-4)
        wrong = other if shared_confusion else (labels + rng.integers(1, NUM_CLASSES, size=n)) % NUM_CLASSES
        pred = np.where(u < np.clip(c - gap, 0.0, 1.0), labels, wrong)
        logits[np.arange(n), level, pred] = np.log(c * (NUM_CLASSES - 1) / (1 - c))
    flops = np.cumsum(np.ones(num_exits)) * 1e6
    return logits, labels.astype(np.int64), flops


def make_graded_outputs(n: int = 1500, num_exits: int = 4, num_classes: int = 10, seed: int = 0):
    """(logits (n, L, C) float32, labels (n,) int64, flops (L,)): harder samples have weaker true-class
    logits, and later exits stronger ones."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    hardness = rng.uniform(0, 1, n)
    strength = np.linspace(0.8, 3.0, num_exits)[None, :] * (1.5 - hardness)[:, None]  # (n, L)
    logits = rng.normal(size=(n, num_exits, num_classes)) * 1.0
    logits[np.arange(n), :, labels] += 2.0 * strength
    flops = np.cumsum(rng.uniform(1.0, 2.0, num_exits)) * 1e6
    return logits.astype(np.float32), labels.astype(np.int64), flops

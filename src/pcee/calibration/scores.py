"""Confidence scores s_l(x) in [0, 1] computed from one exit's logits (docs/architecture.md).

- ``max_prob``: max_k p_k
- ``entropy``: 1 - H(p) / log K (1 for a one-hot p, 0 for the uniform p)
- ``margin``: top-1 minus top-2 probability
"""

from __future__ import annotations

import numpy as np

SCORES = ("max_prob", "entropy", "margin")


def check_score(score: str) -> str:
    """Return ``score`` if it is a known score name, else raise ValueError listing the valid ones."""
    if score not in SCORES:
        raise ValueError(f"unknown confidence score {score!r}; valid scores: {', '.join(SCORES)}")
    return score


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    # the reductions as ufunc calls (what np.max / np.sum call, minus their Python-level dispatch:
    # this runs at every exit of every served request, mostly on a handful of rows)
    z = z - np.maximum.reduce(z, axis=-1, keepdims=True)  # shift so exp never overflows
    e = np.exp(z)
    return e / np.add.reduce(e, axis=-1, keepdims=True)


def _row_max(z: np.ndarray) -> np.ndarray:
    """``np.max(z, axis=-1, keepdims=True)``. For a batch of rows, taken on a column-major copy: numpy
    reduces a short last axis one row at a time (16 µs for 256 x 10), a column-major one in whole
    columns (5 µs with the copy); a maximum is exact, so the order does not change it. (A sum's order
    would change its rounding: the sums stay on the row-major array.)"""
    if z.ndim == 2 and z.shape[0] >= 16:
        return np.maximum.reduce(np.asfortranarray(z), axis=-1, keepdims=True)
    return np.maximum.reduce(z, axis=-1, keepdims=True)


def confidence_from_probs(probs: np.ndarray, score: str = "max_prob") -> np.ndarray:
    """Confidence (...,) from probabilities (..., K)."""
    check_score(score)
    p = np.asarray(probs, dtype=np.float64)
    num_classes = p.shape[-1]
    if score == "max_prob":
        return np.maximum.reduce(p, axis=-1)
    if score == "entropy":
        if num_classes < 2:
            return np.ones(p.shape[:-1])
        # 0 * log 0 = 0: mask zero probabilities instead of producing nan
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        h = -plogp.sum(axis=-1)
        return np.clip(1.0 - h / np.log(num_classes), 0.0, 1.0)
    # margin
    if num_classes < 2:
        return np.ones(p.shape[:-1])
    top2 = np.partition(p, num_classes - 2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def confidence(logits: np.ndarray, score: str = "max_prob") -> np.ndarray:
    """Confidence score (...,) of logits (..., K); ``score`` is one of :data:`SCORES`."""
    check_score(score)
    if score == "max_prob":
        # max_k p_k = 1 / sum_k exp(z_k - max z), bit for bit what softmax then max gives: the largest
        # term is exp(0) = 1 exactly, and dividing by the same sum rounds monotonically, so the largest
        # quotient is fl(1 / sum). It skips a (..., K) division and a reduction at every exit of every request.
        z = np.array(logits, dtype=np.float64)  # a copy: worked on in place below (fewer allocations)
        np.subtract(z, _row_max(z), out=z)
        np.exp(z, out=z)
        return 1.0 / np.add.reduce(z, axis=-1)
    return confidence_from_probs(softmax(logits), score)

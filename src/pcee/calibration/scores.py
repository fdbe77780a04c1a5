"""Confidence scores s_l(x) in [0, 1] computed from one exit's logits (docs/architecture.md).

- ``max_prob``: max_k p_k
- ``entropy``: 1 - H(p) / log K (1 for a one-hot p, 0 for the uniform p)
- ``margin``: top-1 minus top-2 probability

One registry (:data:`SCORE_FORMS`) holds each score in two forms: numpy (:func:`confidence`, what
every policy, map and answer column computes) and torch (:func:`torch_confidence`, float64 on the
logits' device, what the runner's device decisions compute). The torch form follows the same
formula but rounds differently in the last bits (about 1e-15); :mod:`pcee.policies.rules` leaves
every decision that close to a boundary to numpy. An unknown score name is an error in both forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the torch forms use tensor methods only: the policies load without importing torch
    import torch


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


def _max_prob(logits: np.ndarray) -> np.ndarray:
    # max_k p_k = 1 / sum_k exp(z_k - max z), bit for bit what softmax then max gives: the largest
    # term is exp(0) = 1 exactly, and dividing by the same sum rounds monotonically, so the largest
    # quotient is fl(1 / sum). It skips a (..., K) division and a reduction at every exit of every request.
    z = np.array(logits, dtype=np.float64)  # a copy: worked on in place below (fewer allocations)
    np.subtract(z, _row_max(z), out=z)
    np.exp(z, out=z)
    return 1.0 / np.add.reduce(z, axis=-1)


def _max_prob_torch(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return 1.0 / (z - z.amax(dim=-1, keepdim=True)).exp().sum(dim=-1)  # as numpy: the largest term is exp(0) = 1


def _entropy_torch(z: torch.Tensor) -> torch.Tensor:
    k = z.shape[-1]
    if k < 2:
        return z.double().new_ones(z.shape[:-1])
    p = z.double().softmax(dim=-1)
    return (1.0 + p.xlogy(p).sum(dim=-1) / math.log(k)).clamp(0.0, 1.0)


def _margin_torch(z: torch.Tensor) -> torch.Tensor:
    if z.shape[-1] < 2:
        return z.double().new_ones(z.shape[:-1])
    top2 = z.double().softmax(dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@dataclass(frozen=True)
class ScoreForms:
    """One confidence score in both forms: ``numpy(logits (..., K)) -> (...,)`` float64, and
    ``torch(logits tensor (..., K)) -> (...,)`` float64 on the logits' device."""

    name: str
    numpy: Callable[[np.ndarray], np.ndarray]
    torch: Callable[[torch.Tensor], torch.Tensor]


#: every confidence score by name; a new score is one entry here, and every policy, map and the runner know it
SCORE_FORMS: dict[str, ScoreForms] = {
    f.name: f
    for f in (
        ScoreForms("max_prob", _max_prob, _max_prob_torch),
        ScoreForms("entropy", lambda z: confidence_from_probs(softmax(z), "entropy"), _entropy_torch),
        ScoreForms("margin", lambda z: confidence_from_probs(softmax(z), "margin"), _margin_torch),
    )
}
SCORES: tuple[str, ...] = tuple(SCORE_FORMS)


def check_score(score: str) -> str:
    """Return ``score`` if it is a known score name, else raise ValueError listing the valid ones."""
    if score not in SCORE_FORMS:
        raise ValueError(f"unknown confidence score {score!r}; valid scores: {', '.join(SCORES)}")
    return score


def confidence(logits: np.ndarray, score: str = "max_prob") -> np.ndarray:
    """Confidence score (...,) of logits (..., K); ``score`` is one of :data:`SCORES`."""
    return SCORE_FORMS[check_score(score)].numpy(logits)


def torch_confidence(logits: torch.Tensor, score: str = "max_prob") -> torch.Tensor:
    """Confidence score (...,) float64 of a logits tensor (..., K) on its device, by the same formula as
    :func:`confidence` (not bit-identical: about 1e-15 apart)."""
    return SCORE_FORMS[check_score(score)].torch(logits)

"""The oracle: each sample leaves at its first correct exit (else the final one). Needs labels.

It is the physical limit the other policies are compared against, not a deployable rule:
``exit_mask`` cannot be evaluated without labels and raises. :func:`oracle_frontier` gives the
cheapest possible mean cost for every accuracy level, the lower envelope used for area gaps.
"""

from __future__ import annotations

import numpy as np

from pcee.calibration.scores import confidence
from pcee.policies.estimator import PolicyEstimator, check_outputs


def oracle_exits(correct: np.ndarray) -> np.ndarray:
    """First correct exit (N,) from correctness (N, L); L-1 where no exit is correct."""
    correct = np.asarray(correct, dtype=bool)
    num_exits = correct.shape[1]
    return np.where(correct.any(axis=1), np.argmax(correct, axis=1), num_exits - 1).astype(np.int64)


def oracle_frontier(correct: np.ndarray, flops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest mean cost at each reachable accuracy (labels known).

    Every sample may leave at exit 1 (cost F_1); making a sample that exit 1 gets wrong count as
    correct costs F_(its first correct exit) - F_1 extra; adding those extras in increasing order
    gives the minimum cost of each number of correct answers.

    Returns (accuracy (m,), mean_cost (m,)) for accuracies from exit 1's to the oracle's, both increasing.
    """
    correct = np.asarray(correct, dtype=bool)
    flops = np.asarray(flops, dtype=np.float64)
    n = correct.shape[0]
    base = int(correct[:, 0].sum())
    fixable = correct.any(axis=1) & ~correct[:, 0]
    extra = np.sort(flops[np.argmax(correct[fixable], axis=1)] - flops[0])
    cost = flops[0] + np.concatenate([[0.0], np.cumsum(extra)]) / n
    accuracy = (base + np.arange(extra.size + 1)) / n
    return accuracy, cost


class OraclePolicy(PolicyEstimator):
    """No parameters: ``param_name`` is None and ``default_grid()`` is ``[nan]`` (one point)."""

    name = "oracle"
    param_name = None  # type: ignore[assignment]
    param_is_accuracy_target = True
    decides_with_labels = True

    def __init__(self) -> None:
        pass

    @classmethod
    def default_grid(cls) -> np.ndarray:
        return np.array([np.nan])

    @classmethod
    def sweep_grid(cls, deltas: np.ndarray) -> np.ndarray:
        return deltas  # one point whatever the grid; the sweep reads the grid as accuracy levels

    def fit(
        self, logits: np.ndarray, labels: np.ndarray | None = None, flops: np.ndarray | None = None
    ) -> OraclePolicy:
        logits, _, _ = check_outputs(logits, labels, flops)
        self.num_exits_ = logits.shape[1]
        return self

    def exit_mask(self, level: int, logits: np.ndarray) -> np.ndarray:
        raise ValueError("the oracle needs labels and cannot decide exit by exit: call decide(logits, labels)")

    def expected_accuracy(self, level: int, logits: np.ndarray) -> np.ndarray:
        return confidence(self._check_level(level, logits), "max_prob")

    def decide(self, logits: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        if labels is None:
            raise ValueError("the oracle needs labels: call decide(logits, labels)")
        logits, checked_labels, _ = check_outputs(logits, labels)
        return oracle_exits(logits.argmax(axis=-1) == checked_labels[:, None])

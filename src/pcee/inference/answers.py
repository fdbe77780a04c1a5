"""The answers of an early-exit run: their columns, and how a run fills them.

- :class:`ExitResult`: per-sample answers (prediction, exit, confidence, expected accuracy, FLOPs,
  every computed exit's confidence, the answering logits); :func:`answer_columns`: the answer rule's
  columns (the one place the service's answers and the pyfunc model's rows get them from);
  :class:`AllExits`: a run of every exit (shadow requests).
- :class:`AnswerSheet`: the numpy buffers a run writes into, from either decision path: exit by exit
  (``write_exit``, the numpy path) or a whole batch from its logits buffer (``write_batch``, the
  device path, once per batch). Both compute the answer columns with the numpy calls
  ``policy.decide`` and the policy's rule make, so they are bit-identical to "every exit, then decide".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pcee.calibration.scores import confidence
from pcee.policies.rules import ExitRule
from pcee.selective import decisions


@dataclass
class ExitResult:
    """Per-sample answers of an early-exit run (numpy arrays, N samples, L exits).

    prediction : (N,) int64 predicted class
    exit : (N,) int64 exit that answered, 0-based
    confidence : (N,) float64 the policy's confidence score at that exit
    expected_accuracy : (N,) float64 ``policy.expected_accuracy`` at that exit (the map value for PCEE)
    flops : (N,) float64 cumulative F_exit spent on the sample
    confidences : (N, L) float64 score of every exit computed for the sample, NaN after its exit
    logits : (N, K) float32 logits of the exit that answered (None where a runner does not keep them)
    """

    prediction: np.ndarray
    exit: np.ndarray
    confidence: np.ndarray
    expected_accuracy: np.ndarray
    flops: np.ndarray
    confidences: np.ndarray
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.prediction.shape[0])

    def answer_columns(self, threshold: float, mode: str) -> dict[str, np.ndarray]:
        """The answer rule's per-sample columns (:func:`answer_columns`) for these answers."""
        return answer_columns(self.expected_accuracy, threshold, mode)


def answer_columns(expected_accuracy: np.ndarray, threshold: float, mode: str) -> dict[str, np.ndarray]:
    """Per-sample columns of the answer rule ρ = ``threshold`` under ``mode`` (pcee.selective), the
    one place the service's answers and the pyfunc model's rows get them from:

    decision : (N,) object, ``answered`` / ``abstained`` / ``deferred`` (before any forwarding)
    answered, abstained, deferred : (N,) bool, one-hot of ``decision``
    answer_threshold : (N,) float64, ρ
    """
    d = decisions(expected_accuracy, threshold, mode)
    return {
        "decision": d,
        "answered": d == "answered",
        "abstained": d == "abstained",
        "deferred": d == "deferred",
        "answer_threshold": np.full(d.shape, float(threshold), dtype=np.float64),
    }


@dataclass
class AllExits:
    """Every exit of a full run (what a shadow request pays for).

    logits : (N, L, K) float32
    confidences : (N, L) float64 the runner's confidence score at every exit
    final_prediction : (N,) int64 argmax of the final exit
    """

    logits: np.ndarray
    confidences: np.ndarray
    final_prediction: np.ndarray

    def __len__(self) -> int:
        return int(self.final_prediction.shape[0])


class AnswerSheet:
    """The answer columns of a run of ``n`` samples through ``num_exits`` exits, filled as it goes."""

    def __init__(self, n: int, num_exits: int) -> None:
        self.exit = np.zeros(n, dtype=np.int64)
        self.confidence = np.zeros(n, dtype=np.float64)
        self.expected_accuracy = np.zeros(n, dtype=np.float64)
        self.confidences = np.full((n, num_exits), np.nan, dtype=np.float64)
        self.logits: np.ndarray | None = None  # (n, K) float32, once K is known

    def _logits(self, k: int) -> np.ndarray:
        if self.logits is None:
            self.logits = np.zeros((len(self.exit), k), dtype=np.float32)
        return self.logits

    def write_exit(
        self, rows: slice | np.ndarray, level: int, z: np.ndarray, s: np.ndarray, expected: np.ndarray | None
    ) -> None:
        """Exit ``level`` answers every running sample ``rows`` (logits ``z``, scores ``s``): those that go
        on are overwritten at their own exit, so no selection of the leavers is made. ``expected`` None:
        the caller writes the leavers' expected accuracies itself (:meth:`write_expected`)."""
        self.exit[rows] = level
        self.confidence[rows] = s
        self._logits(z.shape[1])[rows] = z
        if expected is not None:
            self.expected_accuracy[rows] = expected

    def write_expected(self, rows: np.ndarray, expected: np.ndarray) -> None:
        self.expected_accuracy[rows] = expected

    def write_batch(self, start: int, exits: np.ndarray, logits: np.ndarray, rule: ExitRule) -> None:
        """Rows ``start:start+b`` from a batch's logits (b, L, K) of every computed exit (entries after a
        sample's exit are ignored) and its exits (b,), with the numpy calls ``decide`` uses."""
        b, num_exits = logits.shape[:2]
        computed = np.arange(num_exits)[None, :] <= exits[:, None]
        scores = np.full((b, num_exits), np.nan, dtype=np.float64)
        scores[computed] = confidence(logits[computed], rule.score)
        rows = np.arange(b)
        z_exit = logits[rows, exits]  # (b, K), a copy
        s_exit = scores[rows, exits]
        expected = np.zeros(b, dtype=np.float64)
        for level in np.unique(exits):
            m = exits == level
            expected[m] = rule.expected(int(level), z_exit[m], s_exit[m])
        sl = slice(start, start + b)
        self.exit[sl] = exits
        self.confidences[sl] = scores
        self.confidence[sl] = s_exit
        self.expected_accuracy[sl] = expected
        self._logits(z_exit.shape[1])[sl] = z_exit

    def result(self, flops: np.ndarray) -> ExitResult:
        """The answers, predictions the answering logits' argmax (taken once per run)."""
        logits = self.logits if self.logits is not None else np.zeros((len(self.exit), 0), dtype=np.float32)
        prediction = np.zeros(len(self.exit), dtype=np.int64)
        if len(self.exit):
            np.argmax(logits, axis=1, out=prediction)
        return ExitResult(
            prediction, self.exit, self.confidence, self.expected_accuracy, flops[self.exit], self.confidences, logits
        )

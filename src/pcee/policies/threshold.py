"""The classic confidence threshold: exit at the first exit whose score reaches τ."""

from __future__ import annotations

import numpy as np

from pcee.calibration.scores import check_score
from pcee.policies.estimator import PolicyEstimator, check_outputs, check_unit
from pcee.policies.rules import ScoreThreshold


class ThresholdPolicy(PolicyEstimator):
    """Exit at the first l < L with s_l(x) >= τ.

    Parameters
    ----------
    tau : float in [0, 1]
        Confidence threshold (the swept parameter).
    score : {"max_prob", "entropy", "margin"}
        ``max_prob`` and ``entropy`` are the classic choices.

    Nothing is learned; ``fit`` only records the number of exits.
    """

    name = "threshold"
    param_name = "tau"
    param_is_accuracy_target = True  # read as one by the naive rule PCEE improves on

    def __init__(self, tau: float = 0.9, score: str = "max_prob") -> None:
        self.tau = tau
        self.score = score
        self._validate_params()

    def _validate_params(self) -> None:
        check_unit("tau", self.tau)
        check_score(self.score)

    def fit(
        self, logits: np.ndarray, labels: np.ndarray | None = None, flops: np.ndarray | None = None
    ) -> ThresholdPolicy:
        self._validate_params()
        logits, _, _ = check_outputs(logits, labels, flops)
        self.num_exits_ = logits.shape[1]
        return self

    def _rule(self) -> ScoreThreshold:
        return ScoreThreshold(self.score, [float(self.tau)] * self.num_exits_)

    @classmethod
    def sweep_grid(cls, deltas: np.ndarray) -> np.ndarray:
        return deltas  # τ is a confidence level in [0, 1], swept like δ

"""MSDNet's budgeted dynamic evaluation (Huang et al., ICLR 2018), as in its PyTorch port.

Exit probabilities P_l ∝ q^l over the L exits (l = 1..L); on validation data, going exit by exit,
the ⌊n·P_l⌋ most confident of the samples still remaining leave at l, which sets the threshold
T_l (the score of the last of them); a test sample leaves at the first l with s_l >= T_l. The
final exit takes whatever remains. The swept parameter is q.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import logsumexp

from pcee.calibration.scores import check_score, confidence
from pcee.policies.estimator import ALWAYS, NEVER, FittedThresholdPolicy, check_outputs


def exit_probabilities(q: float, num_exits: int) -> np.ndarray:
    """P_l ∝ q^l for l = 1..L, normalised (computed in log space)."""
    logp = np.arange(1, num_exits + 1) * np.log(q)
    return np.exp(logp - logsumexp(logp))


def exit_counts(q: float, num_exits: int, n: int) -> np.ndarray:
    """⌊n·P_l⌋ for the non-final exits (L-1,); the tiny slack absorbs rounding of n·P_l."""
    return np.floor(n * exit_probabilities(q, num_exits)[:-1] + 1e-9).astype(np.int64)


class MSDNetBudgetPolicy(FittedThresholdPolicy):
    """Parameters: ``q`` > 0 (the swept parameter), ``score`` (max_prob in MSDNet).

    Attributes: ``probs_`` (L,) exit probabilities, ``thresholds_`` (L,) per-exit thresholds T_l
    (2.0 = nobody leaves, -1.0 = everybody; the last is always -1.0).
    """

    name = "msdnet-budget"
    param_name = "q"
    _fit_params = ("q", "score")

    def __init__(self, q: float = 1.0, score: str = "max_prob") -> None:
        self.q = q
        self.score = score
        self._validate_params()

    def _validate_params(self) -> None:
        try:
            ok = np.isfinite(float(self.q)) and float(self.q) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"q must be a finite number > 0, got {self.q!r}")
        check_score(self.score)

    @classmethod
    def default_grid(cls) -> np.ndarray:
        # the port's grid: q = 0.05, 0.10, ..., 1.95
        return np.round(np.arange(1, 40) * 0.05, 2)

    def fit(
        self, logits: np.ndarray, labels: np.ndarray | None = None, flops: np.ndarray | None = None
    ) -> MSDNetBudgetPolicy:
        self._validate_params()
        logits, _, _ = check_outputs(logits, labels, flops)
        n, num_exits, _ = logits.shape
        scores = confidence(logits, self.score)  # (N, L)
        counts = exit_counts(float(self.q), num_exits, n)
        thresholds = np.full(num_exits, ALWAYS)
        remaining = np.ones(n, dtype=bool)
        for l in range(num_exits - 1):
            cand = np.sort(scores[remaining, l])[::-1]
            m = int(counts[l])
            if m == 0:
                thresholds[l] = NEVER
            elif m >= cand.size:
                thresholds[l] = ALWAYS
            else:
                thresholds[l] = cand[m - 1]
            remaining &= ~(scores[:, l] >= thresholds[l])
        self.probs_ = exit_probabilities(float(self.q), num_exits)
        self.thresholds_ = thresholds
        self.num_exits_ = num_exits
        return self

    def _get_state(self) -> dict[str, Any]:
        return {
            "num_exits": int(self.num_exits_),
            "probs": self.probs_.tolist(),
            "thresholds": self.thresholds_.tolist(),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self.num_exits_ = int(state["num_exits"])
        self.probs_ = np.asarray(state["probs"], dtype=np.float64)
        self.thresholds_ = np.asarray(state["thresholds"], dtype=np.float64)

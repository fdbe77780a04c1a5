"""PCEE(δ): exit at the first exit l < L whose reliability map says accuracy >= δ (docs/architecture.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pcee.calibration.reliability_map import ExitReliabilityMaps
from pcee.calibration.scores import check_score
from pcee.policies.estimator import PolicyEstimator, check_outputs, check_unit, first_passing_exit
from pcee.policies.rules import MapThreshold


class PCEEPolicy(PolicyEstimator):
    """Performance Control Early Exiting.

    Parameters
    ----------
    delta : float in [0, 1]
        Accuracy target δ (the swept parameter).
    score : {"max_prob", "entropy", "margin"}
    n_bins, binning, min_count
        Reliability-map settings (see :class:`~pcee.calibration.reliability_map.ReliabilityMap`);
        bins with fewer than ``min_count`` validation samples never exit.

    Attributes
    ----------
    maps_ : ExitReliabilityMaps, one map per exit (the final exit's map only feeds
        ``expected_accuracy``)
    num_exits_ : int
    """

    name = "pcee"
    param_name = "delta"
    sweeps_in_closed_form = True
    param_is_accuracy_target = True
    has_reliability_maps = True
    _fit_params = ("score", "n_bins", "binning", "min_count")
    _smoothing: str | None = None

    def __init__(
        self,
        delta: float = 0.9,
        score: str = "max_prob",
        n_bins: int = 15,
        binning: str = "equal_width",
        min_count: float = 10,
    ) -> None:
        self.delta = delta
        self.score = score
        self.n_bins = n_bins
        self.binning = binning
        self.min_count = min_count
        self._validate_params()

    def _validate_params(self) -> None:
        check_unit("delta", self.delta)
        check_score(self.score)
        self._make_maps()  # validates n_bins, binning, min_count (and bandwidth in PCEE-WS)

    def _make_maps(self) -> ExitReliabilityMaps:
        return ExitReliabilityMaps(
            score=self.score, n_bins=self.n_bins, binning=self.binning, min_count=self.min_count, smoothing=None
        )

    def fit(
        self,
        logits: np.ndarray,
        labels: np.ndarray,
        flops: np.ndarray | None = None,
        sample_weight: np.ndarray | None = None,
    ) -> PCEEPolicy:
        """Fit one reliability map per exit on validation outputs (flops unused; sample_weight optional)."""
        self._validate_params()
        logits, labels, flops = check_outputs(logits, labels, flops)
        self.maps_ = self._make_maps().fit(logits, labels, sample_weight)
        self.num_exits_ = logits.shape[1]
        return self

    def served_threshold(self) -> float:
        """The map value an exit must reach; δ here, the certified δ' in risk-controlled PCEE."""
        return float(self.delta)

    def map_values(self, logits: np.ndarray) -> np.ndarray:
        """Map value (N, L-1) of each non-final exit, so exit_mask(l, z) == map_values[:, l] >= δ."""
        self._check_fitted()
        logits = np.asarray(logits)
        if logits.ndim != 3 or logits.shape[1] != self.num_exits_:
            raise ValueError(f"logits must be (N, {self.num_exits_}, K), got shape {logits.shape}")
        return self.maps_.predict(logits[:, :-1, :])

    def _rule(self) -> MapThreshold:
        return MapThreshold(
            self.maps_.score, [self.maps_[level] for level in range(self.num_exits_)], self.served_threshold()
        )

    @classmethod
    def sweep_grid(cls, deltas: np.ndarray) -> np.ndarray:
        return deltas

    def decide(self, logits: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        return first_passing_exit(self.map_values(logits) >= self.served_threshold())

    def _get_state(self) -> dict[str, Any]:
        return {"num_exits": int(self.num_exits_), "maps": self.maps_.to_dict()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.num_exits_ = int(state["num_exits"])
        self.maps_ = ExitReliabilityMaps.from_dict(state["maps"])

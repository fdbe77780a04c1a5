"""PCEE-WS(δ): the PCEE rule on smoothed, monotone reliability maps (our definition, docs/architecture.md)."""

from __future__ import annotations

from pcee.calibration.reliability_map import ExitReliabilityMaps
from pcee.policies.pcee import PCEEPolicy


class PCEEWSPolicy(PCEEPolicy):
    """PCEE on maps smoothed by a count-weighted Gaussian kernel (bandwidth h) over bin centres,
    then made non-decreasing by isotonic regression. The smoothing formula is ours (the paper
    names the variant without giving it). The smoothed map is defined in every bin, so there is
    no ``min_count``: thin bins are pulled toward their neighbours instead of being closed.
    """

    name = "pcee-ws"
    _fit_params = ("score", "n_bins", "binning", "bandwidth")

    def __init__(
        self,
        delta: float = 0.9,
        score: str = "max_prob",
        n_bins: int = 15,
        binning: str = "equal_width",
        bandwidth: float = 0.05,
    ) -> None:
        self.bandwidth = bandwidth
        self.min_count = 0
        super().__init__(delta=delta, score=score, n_bins=n_bins, binning=binning, min_count=0)

    def _make_maps(self) -> ExitReliabilityMaps:
        return ExitReliabilityMaps(
            score=self.score,
            n_bins=self.n_bins,
            binning=self.binning,
            min_count=0,
            smoothing="kernel",
            bandwidth=self.bandwidth,
        )

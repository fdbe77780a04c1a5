"""The exit-policy interface shared by PCEE, PCEE-WS and every baseline.

scikit-learn estimator shape: parameters in ``__init__``, learned state in trailing-underscore
attributes set by ``fit``, ``fit`` returns self, ``decide`` is pure.

Per-exit decisions (``exit_mask``) depend only on that exit's logits, so the early-exit runner
can decide after each segment; ``decide`` applies them to all exits at once ("first exit that
accepts; the last exit always answers"). The oracle needs labels and overrides ``decide``.
"""

from __future__ import annotations

from typing import Self

import numpy as np


class ExitPolicy:
    #: registry name, e.g. "pcee"
    name: str = ""
    #: name of the swept parameter (delta, tau, q, budget); stored in sweep.csv's ``delta`` column
    param_name: str = "delta"
    # -- what the policy says about itself (sweeps, the operating-point pipeline, the runner and
    #    recalibration read these instead of switching on names) --
    #: its parameter sweeps in closed form from ``map_values`` (no refit, no loop over values)
    sweeps_in_closed_form: bool = False
    #: its parameter is read as an accuracy target, so a shortfall max(0, value - accuracy) means something
    param_is_accuracy_target: bool = False
    #: a larger parameter value keeps samples to later exits (the operating-point fixed sequence starts there)
    conservative_high: bool = True
    #: it chooses and bounds its own served threshold on a held-out part of what it is fitted on
    certifies_itself: bool = False
    #: it needs labels to decide (the oracle): nothing to serve
    decides_with_labels: bool = False
    #: it has reliability maps (``maps_``, ``map_values``) that recalibration can refit
    has_reliability_maps: bool = False

    def fit(self, logits: np.ndarray, labels: np.ndarray, flops: np.ndarray) -> Self:
        """Fit on validation outputs: logits (N, L, K), labels (N,), cumulative flops (L,)."""
        raise NotImplementedError

    def exit_mask(self, level: int, logits: np.ndarray) -> np.ndarray:
        """Bool (N,): which samples leave at exit ``level`` (0-based, < L-1) given its logits (N, K)."""
        raise NotImplementedError

    def expected_accuracy(self, level: int, logits: np.ndarray) -> np.ndarray:
        """Float (N,): the policy's estimate of accuracy for samples answered at ``level``.

        PCEE returns its reliability-map value; policies without one return the confidence.
        """
        raise NotImplementedError

    def served_threshold(self) -> float:
        """The value its decisions apply now: δ for PCEE, the certified δ' for risk-controlled, τ, q, budget."""
        return float(getattr(self, self.param_name)) if self.param_name else float("nan")

    def decide(self, logits: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Exit index (N,) int64 in [0, L-1] for logits (N, L, K): the first accepting exit, else L-1."""
        n, num_exits, _ = logits.shape
        exits = np.full(n, num_exits - 1, dtype=np.int64)
        undecided = np.ones(n, dtype=bool)
        for level in range(num_exits - 1):
            leave = undecided & self.exit_mask(level, logits[:, level, :])
            exits[leave] = level
            undecided &= ~leave
        return exits

"""The exit-policy interface shared by PCEE, PCEE-WS and every baseline.

scikit-learn estimator shape: parameters in ``__init__``, learned state in trailing-underscore
attributes set by ``fit``, ``fit`` returns self, ``decide`` is pure.

Per-exit decisions (``exit_mask``) depend only on that exit's logits, so the early-exit runner
can decide after each segment; ``decide`` applies them to all exits at once ("first exit that
accepts; the last exit always answers"). The oracle needs labels and overrides ``decide``.
"""

from __future__ import annotations

import numpy as np


class ExitPolicy:
    #: registry name, e.g. "pcee"
    name: str = ""
    #: name of the swept parameter (delta, tau, q, budget); stored in sweep.csv's ``delta`` column
    param_name: str = "delta"

    def fit(self, logits: np.ndarray, labels: np.ndarray, flops: np.ndarray) -> "ExitPolicy":
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

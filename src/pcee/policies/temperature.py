"""Temperature scaling per exit (fit on validation NLL), then the confidence threshold."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from pcee.policies.estimator import check_outputs
from pcee.policies.rules import ScoreThreshold
from pcee.policies.threshold import ThresholdPolicy

#: search range of log T: T in [e^-5, e^5] covers every sensible temperature
LOG_T_BOUNDS = (-5.0, 5.0)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels (N,) under softmax(logits (N, K) / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    lse = cast(np.ndarray, logsumexp(z, axis=1))  # scipy's stub also allows the return_sign tuple
    return float(np.mean(lse - z[np.arange(z.shape[0]), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising validation NLL of one exit (bounded scalar search on log T)."""
    res = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    t = float(np.exp(res.x))
    # guard: never return a temperature that is worse than leaving the logits alone
    return t if nll(logits, labels, t) <= nll(logits, labels, 1.0) else 1.0


class TemperaturePolicy(ThresholdPolicy):
    """Per-exit temperature scaling, then exit at the first l < L with s_l(softmax(z_l / T_l)) >= τ.

    Attributes
    ----------
    temperatures_ : (L,) fitted temperature of each exit
    """

    name = "temperature"
    param_name = "tau"

    def fit(self, logits: np.ndarray, labels: np.ndarray, flops: np.ndarray | None = None) -> TemperaturePolicy:
        self._validate_params()
        logits, labels, _ = check_outputs(logits, labels, flops)
        if labels is None:
            raise ValueError("temperature scaling needs labels")
        self.temperatures_ = np.array([fit_temperature(logits[:, l, :], labels) for l in range(logits.shape[1])])
        self.num_exits_ = logits.shape[1]
        return self

    def _rule(self) -> ScoreThreshold:
        return ScoreThreshold(self.score, [float(self.tau)] * self.num_exits_, temperatures=self.temperatures_)

    def _get_state(self) -> dict[str, Any]:
        return {"num_exits": int(self.num_exits_), "temperatures": self.temperatures_.tolist()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.num_exits_ = int(state["num_exits"])
        self.temperatures_ = np.asarray(state["temperatures"], dtype=np.float64)

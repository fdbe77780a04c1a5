"""EERO (Valade et al., 2024): early exit with a guaranteed average-cost budget.

Per-head acceptance rates from exponential weights,
    ε_l ∝ π_l exp(-(R_l + β B_l) / λ),   π_l ∝ 1 / B_l,
with R_l the head's validation error, B_l = F_l / F_L its *relative* cumulative cost, λ = 0.04,
and β >= 0 the smallest value (bisection) with Σ_l ε_l B_l <= budget. The budget is in the same
relative-cost units (1.0 = every sample runs the whole network).

Head l accepts x when the empirical CDF of its score on the calibration data is
>= 1 - E_l, E_l = ε_1 + ... + ε_l, i.e. x is among the top E_l fraction of head l's calibration
scores; the sample leaves at the first accepting head, and E_L = 1 so the final head absorbs the
rest. Why the budget holds on the calibration data: at least a fraction E_l of it is accepted by
head l, so at least E_l has left by exit l, and since B is non-decreasing the mean cost is
    B_L - Σ_{l<L} P(exit <= l)(B_{l+1} - B_l) <= B_L - Σ_{l<L} E_l (B_{l+1} - B_l) = Σ ε_l B_l.
A budget below B_1 cannot be met: then ε = (1, 0, ..., 0), ``feasible_`` is False and a warning says so.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.special import softmax

from pcee.calibration.scores import check_score, confidence
from pcee.policies.estimator import ALWAYS, NEVER, FittedThresholdPolicy, check_outputs


def eero_rates(errors: np.ndarray, rel_cost: np.ndarray, beta: float, lam: float) -> np.ndarray:
    """ε (L,) for given β: softmax of log π_l - (R_l + β B_l)/λ (stable in log space)."""
    return softmax(-np.log(rel_cost) - (errors + beta * rel_cost) / lam)


def solve_beta(errors: np.ndarray, rel_cost: np.ndarray, budget: float, lam: float) -> tuple[float, np.ndarray, bool]:
    """Smallest β >= 0 (to bisection precision, on the feasible side) with Σ ε_l B_l <= budget.

    Returns (β, ε, feasible). The expected cost falls monotonically in β (its derivative is
    -Var_ε(B)/λ), towards min B as β grows.
    """

    def cost(beta: float) -> float:
        return float(eero_rates(errors, rel_cost, beta, lam) @ rel_cost)

    if cost(0.0) <= budget:
        return 0.0, eero_rates(errors, rel_cost, 0.0, lam), True
    cheapest = np.zeros_like(rel_cost)
    cheapest[int(np.argmin(rel_cost))] = 1.0
    if budget < rel_cost.min():
        return float("inf"), cheapest, False
    hi = 1.0
    while cost(hi) > budget:
        hi *= 2.0
        if hi > 1e12:  # budget == min cost exactly: only the limit ε = e_argmin meets it
            return float("inf"), cheapest, True
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cost(mid) <= budget:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return hi, eero_rates(errors, rel_cost, hi, lam), True


def ecdf_thresholds(scores: np.ndarray, cum_rates: np.ndarray) -> np.ndarray:
    """Per-head thresholds t_l (L,) with  s >= t_l  ⇔  ECDF_l(s) >= 1 - E_l.

    ECDF_l(s) = #{calibration scores of head l <= s} / n, so the condition is
    #{<= s} >= k with k = ceil(n (1 - E_l)), i.e. s >= the k-th smallest calibration score.
    """
    n, num_exits = scores.shape
    sorted_scores = np.sort(scores, axis=0)
    thresholds = np.empty(num_exits)
    for l in range(num_exits):
        e = float(cum_rates[l])
        if l == num_exits - 1 or e >= 1.0:
            thresholds[l] = ALWAYS
            continue
        if e <= 0.0:
            thresholds[l] = NEVER
            continue
        k = int(np.ceil(n * (1.0 - e) - 1e-9))  # slack only ever accepts more, never less
        thresholds[l] = ALWAYS if k <= 0 else sorted_scores[min(k, n) - 1, l]
    return thresholds


class EEROPolicy(FittedThresholdPolicy):
    """Parameters: ``budget`` (relative cost, the swept parameter), ``score``, ``lam`` (λ).

    Attributes: ``rates_`` ε (L,), ``beta_``, ``errors_`` R (L,), ``rel_cost_`` B (L,),
    ``thresholds_`` (L,) (2.0 = nobody, -1.0 = everybody), ``feasible_``.
    """

    name = "eero"
    param_name = "budget"
    _fit_params = ("budget", "score", "lam")

    def __init__(self, budget: float = 0.5, score: str = "max_prob", lam: float = 0.04) -> None:
        self.budget = budget
        self.score = score
        self.lam = lam
        self._validate_params()

    def _validate_params(self) -> None:
        for key in ("budget", "lam"):
            value = getattr(self, key)
            try:
                ok = np.isfinite(float(value)) and float(value) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
        check_score(self.score)

    @classmethod
    def default_grid(cls) -> np.ndarray:
        return np.round(np.arange(2, 41) * 0.025, 3)  # relative budgets 0.05 .. 1.0

    def fit(self, logits: np.ndarray, labels: np.ndarray, flops: np.ndarray) -> EEROPolicy:
        self._validate_params()
        if flops is None:
            raise ValueError("EERO needs the cumulative flops (L,) to define its budget")
        logits, labels, flops = check_outputs(logits, labels, flops)
        if labels is None:
            raise ValueError("EERO needs labels to measure each head's validation error")
        scores = confidence(logits, self.score)  # (N, L)
        errors = 1.0 - (logits.argmax(axis=-1) == labels[:, None]).mean(axis=0)
        rel_cost = flops / flops[-1]
        beta, rates, feasible = solve_beta(errors, rel_cost, float(self.budget), float(self.lam))
        if not feasible:
            warnings.warn(
                f"EERO budget {self.budget} is below the cost of the first exit ({rel_cost[0]:.4f} relative); "
                "every sample leaves at exit 1",
                RuntimeWarning,
                stacklevel=2,
            )
        cum = np.cumsum(rates)
        cum[-1] = 1.0
        self.errors_, self.rel_cost_, self.beta_, self.rates_ = errors, rel_cost, beta, rates
        self.feasible_ = feasible
        self.thresholds_ = ecdf_thresholds(scores, cum)
        self.num_exits_ = logits.shape[1]
        return self

    def _get_state(self) -> dict[str, Any]:
        return {
            "num_exits": int(self.num_exits_),
            "errors": self.errors_.tolist(),
            "rel_cost": self.rel_cost_.tolist(),
            "beta": None if not np.isfinite(self.beta_) else float(self.beta_),
            "rates": self.rates_.tolist(),
            "thresholds": self.thresholds_.tolist(),
            "feasible": bool(self.feasible_),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self.num_exits_ = int(state["num_exits"])
        self.errors_ = np.asarray(state["errors"], dtype=np.float64)
        self.rel_cost_ = np.asarray(state["rel_cost"], dtype=np.float64)
        self.beta_ = float("inf") if state["beta"] is None else float(state["beta"])
        self.rates_ = np.asarray(state["rates"], dtype=np.float64)
        self.thresholds_ = np.asarray(state["thresholds"], dtype=np.float64)
        self.feasible_ = bool(state["feasible"])

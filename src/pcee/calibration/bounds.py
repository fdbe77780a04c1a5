"""Upper confidence bounds on an error rate from k errors in n calibration samples.

Used by risk-controlled PCEE (Learn-then-Test, Angelopoulos et al. 2021): the null hypothesis
"risk > r" is rejected at level eta when the p-value is <= eta, which is the same as the bound
``upper_bound(k, n, eta) <= r``.

- ``clopper-pearson``: exact binomial; p = P(Bin(n, r) <= k), UCB = Beta^{-1}(1 - eta; k+1, n-k).
- ``hoeffding-bentkus``: p = min(exp(-n h(min(k/n, r), r)), e * P(Bin(n, r) <= k)) with
  h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)); the UCB inverts it by bisection.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from scipy.special import xlogy

BOUNDS = ("clopper-pearson", "hoeffding-bentkus")


def check_bound(method: str) -> str:
    if method not in BOUNDS:
        raise ValueError(f"unknown bound {method!r}; valid: {', '.join(BOUNDS)}")
    return method


def _kl_bernoulli(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return xlogy(a, a) - xlogy(a, b) + xlogy(1 - a, 1 - a) - xlogy(1 - a, 1 - b)


def p_value(k: np.ndarray, n: int, risk: float | np.ndarray, method: str = "clopper-pearson") -> np.ndarray:
    """p-value of H0 "true error > risk" after observing k errors in n samples (vectorised in k)."""
    check_bound(method)
    k = np.asarray(k, dtype=np.float64)
    r = np.broadcast_to(np.asarray(risk, dtype=np.float64), k.shape)
    if n <= 0:
        return np.ones_like(k)
    binom = stats.binom.cdf(k, n, r)
    if method == "clopper-pearson":
        return np.clip(binom, 0.0, 1.0)
    rhat = k / n
    with np.errstate(divide="ignore", invalid="ignore"):
        hoeff = np.exp(-n * _kl_bernoulli(np.minimum(rhat, r), r))
    hoeff = np.where(np.isfinite(hoeff), hoeff, 1.0)
    return np.clip(np.minimum(hoeff, np.e * binom), 0.0, 1.0)


def upper_bound(k: np.ndarray, n: int, eta: float, method: str = "clopper-pearson") -> np.ndarray:
    """(1 - eta) upper confidence bound on the error rate given k errors in n samples."""
    check_bound(method)
    if not 0 < eta < 1:
        raise ValueError(f"eta must be in (0, 1), got {eta!r}")
    k = np.asarray(k, dtype=np.float64)
    if n <= 0:
        return np.ones_like(k)
    if method == "clopper-pearson":
        with np.errstate(invalid="ignore"):
            ucb = stats.beta.ppf(1 - eta, k + 1, n - k)
        return np.where(k >= n, 1.0, ucb)
    # bisection: p_value is non-increasing in the tested risk, find the smallest r with p <= eta
    lo, hi = k / n, np.ones_like(k)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        reject = p_value(k, n, mid, method) <= eta
        hi = np.where(reject, mid, hi)
        lo = np.where(reject, lo, mid)
    return hi

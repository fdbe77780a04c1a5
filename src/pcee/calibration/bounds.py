"""Upper confidence bounds on an error rate from k errors in n calibration samples.

Used by risk-controlled PCEE (Learn-then-Test, Angelopoulos et al. 2021): the null hypothesis
"risk > r" is rejected at level eta when the p-value is <= eta, which is the same as the bound
``upper_bound(k, n, eta) <= r``.

- ``clopper-pearson``: exact binomial; p = P(Bin(n, r) <= k), UCB = Beta^{-1}(1 - eta; k+1, n-k).
- ``hoeffding-bentkus``: p = min(exp(-n h(min(k/n, r), r)), e * P(Bin(n, r) <= k)) with
  h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)); the UCB inverts it by bisection. Valid for any
  loss in [0, 1] (k is then the sum of the losses).
- ``wsr``: the Waudby-Smith--Ramdas betting bound (predictable-plug-in bets, as RCPS and RC-EENN's
  UCB-WSR): the smallest mean μ at which a gambler betting against "mean >= μ" has not multiplied
  their wealth by 1/eta. It needs the loss *sequence* (in a random order), not only its sum, and
  adapts to the variance, so it is tighter than Hoeffding-Bentkus where the losses vary little.

:func:`loss_upper_bound` takes per-sample losses and dispatches to any of the three; the
operating-point pipeline (:mod:`pcee.operating_point`) calls only it.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from scipy import optimize, stats
from scipy.special import xlogy

BOUNDS = ("clopper-pearson", "hoeffding-bentkus", "wsr")
#: bounds that work from an error count alone (k, n)
COUNT_BOUNDS = ("clopper-pearson", "hoeffding-bentkus")


def check_bound(method: str) -> str:
    if method not in BOUNDS:
        raise ValueError(f"unknown bound {method!r}; valid: {', '.join(BOUNDS)}")
    return method


def _kl_bernoulli(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return xlogy(a, a) - xlogy(a, b) + xlogy(1 - a, 1 - a) - xlogy(1 - a, 1 - b)


def _check_count_bound(method: str) -> None:
    check_bound(method)
    if method not in COUNT_BOUNDS:
        raise ValueError(f"the {method!r} bound needs the per-sample losses, not a count: use loss_upper_bound")


def p_value(k: np.ndarray, n: int, risk: float | np.ndarray, method: str = "clopper-pearson") -> np.ndarray:
    """p-value of H0 "true error > risk" after observing k errors in n samples (vectorised in k)."""
    _check_count_bound(method)
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
    _check_count_bound(method)
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


def wsr_upper_bound(losses: np.ndarray, eta: float) -> float:
    """(1 - eta) Waudby-Smith--Ramdas upper bound on the mean of losses in [0, 1], in their order.

    Bets ν_t = min(1, sqrt(2 log(1/eta) / (n σ²_{t-1}))) with the running (regularised) mean and
    variance of the losses seen before t; the bound is the smallest μ at which the capital
    max_t Π (1 - ν_t (x_t - μ)) reaches 1/eta (Waudby-Smith & Ramdas 2023; Bates et al. 2021).
    """
    x = np.asarray(losses, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        return 1.0
    t = np.arange(1, n + 1)
    mu_hat = (np.cumsum(x) + 0.5) / (t + 1)
    sigma2 = (np.cumsum((x - mu_hat) ** 2) + 0.25) / (t + 1)
    sigma2_prev = np.concatenate([[0.25], sigma2[:-1]])  # predictable: uses losses before t only
    nu = np.minimum(np.sqrt(2.0 * np.log(1.0 / eta) / (n * sigma2_prev)), 1.0)
    log_eta = np.log(eta)

    def excess(mu: float) -> float:  # log capital at its peak minus log(1/eta); increasing in mu
        return float(np.max(np.cumsum(np.log1p(-nu * (x - mu))))) + log_eta

    lo, hi = 1e-10, 1.0 - 1e-10
    if excess(hi) < 0:
        return 1.0
    if excess(lo) >= 0:
        return 0.0
    # scipy's stub also allows the (root, RootResults) pair of full_output=True
    return float(cast(float, optimize.brentq(excess, lo, hi, xtol=1e-9)))


def loss_upper_bound(losses: np.ndarray, eta: float, method: str = "clopper-pearson") -> np.ndarray:
    """(1 - eta) upper confidence bounds on mean losses: ``losses`` (n,) or (G, n) in [0, 1] -> (G,).

    Clopper-Pearson needs 0/1 losses (errors); Hoeffding-Bentkus and WSR take any loss in [0, 1].
    """
    check_bound(method)
    if not 0 < eta < 1:
        raise ValueError(f"eta must be in (0, 1), got {eta!r}")
    x = np.atleast_2d(np.asarray(losses, dtype=np.float64))
    if x.size and (np.any(~np.isfinite(x)) or x.min() < 0 or x.max() > 1):
        raise ValueError("losses must be finite and in [0, 1]")
    n = x.shape[1]
    if method == "wsr":
        # neighbouring grid points often serve the same exits: bound each distinct sequence once
        unique, inverse = np.unique(x, axis=0, return_inverse=True)
        return np.array([wsr_upper_bound(row, eta) for row in unique])[np.ravel(inverse)]
    if method == "clopper-pearson" and np.any((x != 0) & (x != 1)):
        raise ValueError("the clopper-pearson bound is for 0/1 losses; use hoeffding-bentkus or wsr for costs")
    if method == "hoeffding-bentkus" and np.any((x != 0) & (x != 1)):
        # the Bentkus term's binomial tail is taken at ceil(sum), which keeps it valid for [0, 1] losses
        return upper_bound(np.ceil(x.sum(axis=1) - 1e-9), n, eta, method)
    return upper_bound(x.sum(axis=1), n, eta, method)

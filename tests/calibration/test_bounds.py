import numpy as np
import pytest
from scipy import stats

from pcee.calibration.bounds import p_value, upper_bound


def test_clopper_pearson_matches_binomial_duality():
    n, eta = 200, 0.1
    k = np.arange(0, 201)
    ucb = upper_bound(k, n, eta, "clopper-pearson")
    assert ucb[-1] == 1.0 and np.all(np.diff(ucb) > 0)
    # at the bound the binomial tail equals eta: P(Bin(n, ucb) <= k) = eta
    np.testing.assert_allclose(stats.binom.cdf(k[:-1], n, ucb[:-1]), eta, rtol=1e-6)
    # p_value <= eta  <=>  ucb <= r
    r = 0.2
    np.testing.assert_array_equal(p_value(k, n, r) <= eta, ucb <= r + 1e-12)


def test_hoeffding_bentkus_bound_is_valid_and_above_clopper_pearson():
    n, eta = 500, 0.05
    k = np.array([0, 10, 50, 200])
    hb = upper_bound(k, n, eta, "hoeffding-bentkus")
    cp = upper_bound(k, n, eta, "clopper-pearson")
    assert np.all(hb >= cp - 1e-9) and np.all(hb >= k / n)
    np.testing.assert_allclose(p_value(k, n, hb, "hoeffding-bentkus"), eta, atol=1e-6)


def test_coverage_by_simulation():
    rng = np.random.default_rng(0)
    n, eta, r = 300, 0.1, 0.15
    k = rng.binomial(n, r, size=5000)
    miss = np.mean(upper_bound(k, n, eta, "clopper-pearson") < r)
    assert miss <= eta + 3 * np.sqrt(eta * (1 - eta) / 5000)


def test_bad_arguments():
    with pytest.raises(ValueError, match="clopper-pearson"):
        upper_bound(np.array([1]), 10, 0.1, "wilson")
    with pytest.raises(ValueError, match="eta"):
        upper_bound(np.array([1]), 10, 1.5)

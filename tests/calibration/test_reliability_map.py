import json

import numpy as np
import pytest

from pcee.calibration.reliability_map import ExitReliabilityMaps, ReliabilityMap


def _synthetic(n_bins=10, per_bin=2000, seed=0):
    """Scores uniform in each bin, correctness Bernoulli with a known per-bin accuracy."""
    rng = np.random.default_rng(seed)
    true_acc = np.linspace(0.1, 0.95, n_bins)
    b = np.repeat(np.arange(n_bins), per_bin)
    s = (b + rng.uniform(0.01, 0.99, b.size)) / n_bins
    c = rng.random(b.size) < true_acc[b]
    return s, c, true_acc


def test_equal_width_recovers_known_accuracy_and_exact_counts():
    s, c, true_acc = _synthetic()
    m = ReliabilityMap(n_bins=10, min_count=1).fit(s, c)
    np.testing.assert_array_equal(m.counts_, np.full(10, 2000.0))
    # 4 standard errors of a proportion with n = 2000
    se = np.sqrt(true_acc * (1 - true_acc) / 2000)
    assert np.all(np.abs(m.acc_ - true_acc) < 4 * se)
    np.testing.assert_allclose(m.edges_, np.linspace(0, 1, 11))
    np.testing.assert_allclose(m.predict(np.array([0.05, 0.55, 1.0])), m.acc_[[0, 5, 9]])


def test_bin_index_follows_design_formula():
    m = ReliabilityMap(n_bins=15, min_count=0).fit(np.array([0.0, 1.0]), np.array([1, 0]))
    s = np.array([0.0, 1 / 15 - 1e-12, 1 / 15, 0.5, 0.999999, 1.0])
    np.testing.assert_array_equal(m.bin_index(s), np.minimum(np.floor(s * 15), 14).astype(int))


def test_counts_are_weighted_with_sample_weight():
    s = np.array([0.05, 0.05, 0.95, 0.95])
    c = np.array([1, 0, 1, 1])
    m = ReliabilityMap(n_bins=2, min_count=0).fit(s, c, sample_weight=np.array([3.0, 1.0, 1.0, 1.0]))
    np.testing.assert_allclose(m.counts_, [4.0, 2.0])
    np.testing.assert_allclose(m.acc_, [0.75, 1.0])


def test_equal_mass_bins_have_about_equal_counts():
    rng = np.random.default_rng(1)
    s = rng.beta(8, 2, size=3000)  # skewed toward high confidence
    c = rng.random(3000) < s
    m = ReliabilityMap(n_bins=15, binning="equal_mass", min_count=0).fit(s, c)
    assert m.counts_.sum() == 3000
    assert np.all(np.abs(m.counts_ - 200) <= 1)
    assert m.edges_[0] == 0.0 and m.edges_[-1] == 1.0 and np.all(np.diff(m.edges_) >= 0)
    # the lookup is the one used in fit: predictions on the fit scores reproduce the bin counts
    np.testing.assert_array_equal(np.bincount(m.bin_index(s), minlength=15), m.counts_)


def test_bins_under_min_count_predict_zero():
    s = np.concatenate([np.full(50, 0.95), np.full(5, 0.55)])
    c = np.ones(55)
    m = ReliabilityMap(n_bins=10, min_count=10).fit(s, c)
    assert m.predict(np.array([0.95]))[0] == 1.0
    assert m.predict(np.array([0.55]))[0] == 0.0  # 5 < min_count although all 5 were correct
    assert m.raw_acc_[5] == 1.0


def test_smoothed_map_is_monotone_and_defined_everywhere():
    rng = np.random.default_rng(2)
    s = rng.beta(5, 2, size=400)
    c = rng.random(400) < s**2
    m = ReliabilityMap(n_bins=15, smoothing="kernel").fit(s, c)
    grid = np.linspace(0, 1, 1001)
    v = m.predict(grid)
    assert np.all(np.isfinite(v)) and np.all((v >= 0) & (v <= 1))
    assert np.all(np.diff(v) >= -1e-12)
    assert np.all(np.diff(m.acc_) >= -1e-12)
    assert np.any(m.counts_ == 0)  # some empty low-confidence bins ...
    assert np.all(m.acc_[m.counts_ == 0] >= 0)  # ... still have a value
    # smoothing differs from the raw (non-monotone, noisy) map but stays close where data is dense
    dense = m.counts_ >= 30
    assert np.max(np.abs(m.acc_[dense] - m.raw_acc_[dense])) < 0.2


def test_map_json_round_trip_is_exact():
    s, c, _ = _synthetic(n_bins=15, per_bin=30)
    for kw in ({}, {"binning": "equal_mass"}, {"smoothing": "kernel", "bandwidth": 0.1}):
        m = ReliabilityMap(**kw).fit(s, c)
        m2 = ReliabilityMap.from_dict(json.loads(json.dumps(m.to_dict(), allow_nan=False)))
        assert m2.get_params() == m.get_params()
        probe = np.linspace(0, 1, 333)
        np.testing.assert_array_equal(m2.predict(probe), m.predict(probe))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_bins": 0}, "n_bins"),
        ({"binning": "quantile"}, "equal_width, equal_mass"),
        ({"smoothing": "loess"}, "smoothing"),
        ({"min_count": -1}, "min_count"),
        ({"bandwidth": 0}, "bandwidth"),
    ],
)
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReliabilityMap(**kwargs)


def test_fit_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        ReliabilityMap().fit(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="zero samples"):
        ReliabilityMap().fit(np.zeros(0), np.zeros(0))


def test_exit_maps_fit_predict_and_save_load(tmp_path):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(300, 3, 4)) * 3
    labels = rng.integers(0, 4, 300)
    maps = ExitReliabilityMaps(score="margin", n_bins=8).fit(logits, labels)
    assert len(maps) == 3
    v = maps.predict(logits)
    assert v.shape == (300, 3)
    path = maps.save(tmp_path / "maps.json")
    loaded = ExitReliabilityMaps.load(path)
    np.testing.assert_array_equal(loaded.predict(logits[:, :2]), v[:, :2])
    raw = json.loads(path.read_text())
    assert set(raw["maps"][0]) >= {"edges", "acc", "counts", "params"}
    assert raw["params"]["score"] == "margin"

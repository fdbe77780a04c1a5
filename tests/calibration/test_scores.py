import numpy as np
import pytest

from pcee.calibration.scores import SCORES, confidence, softmax


def test_softmax_is_stable_and_normalised():
    z = np.array([[1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0]])
    p = softmax(z)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0], atol=1e-12)


def test_scores_by_hand():
    p = np.array([0.5, 0.25, 0.25])
    z = np.log(p)[None, :]
    h = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))  # 1.0397
    assert confidence(z, "max_prob")[0] == pytest.approx(0.5)
    assert confidence(z, "entropy")[0] == pytest.approx(1 - h / np.log(3))
    assert confidence(z, "entropy")[0] == pytest.approx(0.05360, abs=1e-4)
    assert confidence(z, "margin")[0] == pytest.approx(0.25)


def test_scores_at_the_extremes():
    uniform = np.zeros((1, 4))
    one_hot = np.array([[0.0, -1e4, -1e4, -1e4]])
    assert confidence(uniform, "entropy")[0] == pytest.approx(0.0, abs=1e-12)
    assert confidence(one_hot, "entropy")[0] == pytest.approx(1.0)
    assert confidence(uniform, "margin")[0] == pytest.approx(0.0)
    assert confidence(one_hot, "margin")[0] == pytest.approx(1.0)


def test_scores_keep_leading_shape_and_range():
    z = np.random.default_rng(0).normal(size=(7, 3, 10)) * 5
    for score in SCORES:
        s = confidence(z, score)
        assert s.shape == (7, 3)
        assert np.all((s >= 0) & (s <= 1))


def test_unknown_score_lists_the_valid_ones():
    with pytest.raises(ValueError, match="max_prob, entropy, margin"):
        confidence(np.zeros((2, 3)), "confidnce")

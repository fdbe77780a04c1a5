"""jpeg_compress: the JPEG round trip of the shift benchmarks (quality 10 and 5): shapes and types kept,
harsher quality damages more, bad qualities refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcee.data.corruptions import jpeg_compress


def test_jpeg_keeps_shape_and_type_and_damages_more_at_lower_quality():
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0.5, 0.2, (8, 3, 32, 32)), 0, 1).astype(np.float32)
    damage = []
    for quality in (90, 40, 10, 5):
        y = jpeg_compress(x, quality)
        assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0.0 and y.max() <= 1.0
        damage.append(float(np.abs(y - x).mean()))
    assert damage == sorted(damage) and damage[-1] > damage[0]
    one = jpeg_compress(torch.from_numpy(x[0, :1]), 10)  # one single-channel image, as torch
    assert isinstance(one, torch.Tensor) and one.shape == (1, 32, 32)


@pytest.mark.parametrize("quality", [0, 101, True, 2.5])
def test_bad_quality_is_refused(quality):
    with pytest.raises(ValueError, match="JPEG quality"):
        jpeg_compress(np.zeros((1, 1, 8, 8), np.float32), quality)

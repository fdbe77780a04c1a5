"""Corruptions: stronger with severity, inside [0, 1], same type out as in, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcee.data import load_dataset
from pcee.data.corruptions import CORRUPTIONS, corrupt


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_dataset("digits").test.x[:200]  # (200, 1, 8, 8)


@pytest.fixture(scope="module")
def smooth_rgb() -> np.ndarray:
    """Natural-ish 3x32x32 images: random 8x8 colour fields upsampled smoothly, plus texture."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((64, 3, 8, 8), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bicubic", align_corners=False)
    texture = torch.from_numpy(rng.normal(0, 0.03, (64, 3, 32, 32)).astype(np.float32))
    return (0.1 + 0.8 * smooth + texture).clamp(0, 1).numpy()


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("images", ["digits", "smooth_rgb"])
def test_damage_grows_with_severity_and_stays_in_range(name, images, request):
    x = request.getfixturevalue(images)
    diffs = []
    for severity in range(1, 6):
        out = corrupt(x, name, severity, seed=0)
        assert out.shape == x.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        diffs.append(float(np.abs(out - x).mean()))
    assert diffs[0] > 0
    assert all(b > a for a, b in zip(diffs, diffs[1:])), f"{name} on {images}: {diffs}"


def test_pixelate_matches_pil_box_resampling(smooth_rgb):
    from PIL import Image

    u8 = np.round(smooth_rgb[:8] * 255).astype(np.uint8)
    x = u8.astype(np.float32) / 255
    ours = corrupt(x, "pixelate", 5)
    for img, got in zip(u8, ours):
        pil = Image.fromarray(img.transpose(1, 2, 0)).resize((20, 20), Image.BOX).resize((32, 32), Image.BOX)
        ref = np.asarray(pil).transpose(2, 0, 1).astype(np.float32) / 255
        assert np.abs(ref - got).max() <= 1.01 / 255  # PIL rounds to uint8 in between


def test_torch_and_numpy_agree_and_types_are_kept(digits):
    for name in CORRUPTIONS:
        a = corrupt(digits, name, 3, seed=4)
        b = corrupt(torch.from_numpy(digits), name, 3, seed=4)
        assert isinstance(a, np.ndarray) and isinstance(b, torch.Tensor) and b.dtype == torch.float32
        np.testing.assert_allclose(a, b.numpy(), atol=1e-6)
        single = corrupt(digits[0], name, 3, seed=4)
        assert single.shape == (1, 8, 8)


def test_noise_is_seeded(digits):
    a = corrupt(digits, "gaussian_noise", 2, seed=1)
    np.testing.assert_array_equal(a, corrupt(digits, "gaussian_noise", 2, seed=1))
    assert not np.array_equal(a, corrupt(digits, "gaussian_noise", 2, seed=2))


def test_input_is_not_modified(digits):
    before = digits.copy()
    for name in CORRUPTIONS:
        corrupt(digits, name, 5)
    np.testing.assert_array_equal(digits, before)


def test_bad_name_severity_and_shape_are_refused(digits):
    with pytest.raises(ValueError) as err:
        corrupt(digits, "fog", 1)
    assert all(name in str(err.value) for name in CORRUPTIONS)
    for bad in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="1, 2, 3, 4, 5"):
            corrupt(digits, "contrast", bad)
    with pytest.raises(ValueError, match="C in"):
        corrupt(np.zeros((2, 4, 8, 8), np.float32), "contrast", 1)

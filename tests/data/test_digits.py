"""The embedded default dataset and the name parser's bad-input messages."""

from __future__ import annotations

import numpy as np
import pytest

from pcee.data import DATASET_NAMES, load_dataset


def test_digits_shapes_range_and_metadata():
    splits = load_dataset("digits")
    assert splits.name == "digits" and splits.num_classes == 10
    assert splits.class_names == [str(i) for i in range(10)]
    assert splits.input_shape == (1, 8, 8)
    assert sum(splits.sizes().values()) == 1797
    for split in (splits.train, splits.val, splits.test):
        assert split.x.dtype == np.float32 and split.y.dtype == np.int64
        assert split.x.shape[1:] == (1, 8, 8)
        assert split.x.min() == 0.0 and split.x.max() == 1.0  # 0..16 scaled, the full range occurs
        assert set(np.unique(split.y)) == set(range(10))
    # 0..16 / 16: every pixel is a multiple of 1/16
    np.testing.assert_array_equal(splits.train.x * 16, np.round(splits.train.x * 16))


def test_train_size_cap_on_digits():
    splits = load_dataset("digits", train_size=100)
    assert len(splits.train) == 100 and len(splits.val) == 359
    assert np.bincount(splits.train.y).min() >= 9  # stratified: every class present


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        load_dataset("mnist")
    message = str(err.value)
    assert "mnist" in message
    for name in ("digits", "cifar10", "cifar100", "imagefolder:<path>", "prepared:<dir>"):
        assert name in message
    assert set(DATASET_NAMES) == {"digits", "cifar10", "cifar100", "imagefolder", "prepared"}


def test_path_part_on_a_name_without_one_is_refused():
    with pytest.raises(ValueError, match="takes no"):
        load_dataset("digits:/somewhere")

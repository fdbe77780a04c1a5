"""Splits: deterministic from a seed, disjoint, sized as asked, stratified; bad sizes fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from pcee.data.datasets import load_dataset
from pcee.data.splits import split_indices, stratified_subset

LABELS = np.repeat(np.arange(5), [40, 30, 20, 60, 50])  # 200 samples, unbalanced classes


def test_split_indices_deterministic_disjoint_and_complete():
    a = split_indices(LABELS, seed=3, val_size=0.2, test_size=0.25)
    b = split_indices(LABELS, seed=3, val_size=0.2, test_size=0.25)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(a[part], b[part])
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (110, 40, 50)
    everything = np.concatenate([a["train"], a["val"], a["test"]])
    assert len(np.unique(everything)) == len(LABELS)  # disjoint and covering


def test_split_indices_depend_on_seed():
    a = split_indices(LABELS, seed=0, val_size=0.2, test_size=0.2)
    b = split_indices(LABELS, seed=1, val_size=0.2, test_size=0.2)
    assert not np.array_equal(a["val"], b["val"])


def test_split_is_stratified():
    idx = split_indices(LABELS, seed=0, val_size=50, test_size=0.2)
    full = np.bincount(LABELS) / len(LABELS)
    for part in ("train", "val", "test"):
        share = np.bincount(LABELS[idx[part]], minlength=5) / len(idx[part])
        assert np.abs(share - full).max() <= 1.0 / len(idx[part]) + 1e-9


def test_train_size_caps_the_training_split_only():
    idx = split_indices(LABELS, seed=0, val_size=0.2, test_size=0.2, train_size=30)
    assert (len(idx["train"]), len(idx["val"]), len(idx["test"])) == (30, 40, 40)
    free = split_indices(LABELS, seed=0, val_size=0.2, test_size=0.2)
    assert set(idx["train"]) <= set(free["train"])  # a subset of what would have been trained on


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_size": 0.0, "test_size": 0.2}, "val_size"),
        ({"val_size": 1.5, "test_size": 0.2}, "val_size"),
        ({"val_size": 0.2, "test_size": 500}, "test_size"),
        ({"val_size": 160, "test_size": 40}, "no training data"),
        ({"val_size": "a lot", "test_size": 0.2}, "val_size"),
        ({"val_size": 0.2, "test_size": 0.2, "train_size": 0}, "train_size"),
    ],
)
def test_bad_sizes_fail_naming_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_indices(LABELS, seed=0, **kwargs)


def test_stratified_subset_is_a_deterministic_cap():
    a = stratified_subset(LABELS, 20, seed=0, what="cap")
    assert len(a) == 20 and np.array_equal(a, stratified_subset(LABELS, 20, seed=0, what="cap"))
    assert len(stratified_subset(LABELS, 10_000, seed=0, what="cap")) == len(LABELS)


def test_digits_splits_are_the_indexed_rows_of_the_bundled_data():
    splits = load_dataset("digits", seed=7, val_size=0.15, test_size=300)
    bunch = load_digits()
    idx = split_indices(bunch.target, seed=7, val_size=0.15, test_size=300)
    assert splits.sizes() == {"train": 1797 - 270 - 300, "val": 270, "test": 300}
    for part in ("train", "val", "test"):
        split = getattr(splits, part)
        np.testing.assert_array_equal(split.y, bunch.target[idx[part]])
        np.testing.assert_allclose(split.x.reshape(len(split), 64), bunch.data[idx[part]] / 16.0, rtol=0, atol=1e-7)
    again = load_dataset("digits", seed=7, val_size=0.15, test_size=300)
    np.testing.assert_array_equal(again.val.x, splits.val.x)
    other = load_dataset("digits", seed=8, val_size=0.15, test_size=300)
    assert not np.array_equal(other.val.y, splits.val.y) or not np.array_equal(other.val.x, splits.val.x)

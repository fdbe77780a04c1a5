"""GX suites on the per-sample summary frame (no services)."""

import dataclasses

import numpy as np
import pytest

from pcee.data.datasets import ArraySplit, load_dataset
from pcee.validation import ValidationFailed, summarize_array, validate_batch, validate_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_summary_frame_columns_and_values():
    x = np.zeros((3, 1, 4, 5), dtype=np.float32)
    x[1] = 0.5
    x[2, 0, 0, 0] = np.nan
    df = summarize_array(x, np.array([1, 2, 3]), "train")
    assert list(df.columns) == ["label", "height", "width", "channels", "min", "max", "mean", "n_nonfinite", "split"]
    assert df["height"].tolist() == [4] * 3 and df["width"].tolist() == [5] * 3 and df["channels"].tolist() == [1] * 3
    assert df["mean"].tolist() == [0.0, 0.5, 0.0] and df["n_nonfinite"].tolist() == [0, 0, 1]


def test_summary_refuses_non_images():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        summarize_array(np.zeros((3, 8, 8)))


def test_real_digits_pass(digits):
    report = validate_dataset(digits)
    assert report.success and len(report.results) == 12


def test_corrupted_labels_fail_and_are_named(digits):
    bad = dataclasses.replace(digits, train=ArraySplit(digits.train.x, (digits.train.y + 3) % 13))
    with pytest.raises(ValidationFailed) as err:
        validate_dataset(bad)
    failing = {(f["expectation"], f["column"]) for f in err.value.failures}
    assert ("expect_column_values_to_be_in_set", "label") in failing
    assert "expect_column_values_to_be_in_set(label)" in str(err.value)


def test_class_imbalance_fails(digits):
    keep = digits.train.y != 3
    keep[np.flatnonzero(digits.train.y == 3)[:5]] = True  # 5 of ~108 left: share far below 0.5/K
    bad = dataclasses.replace(digits, train=ArraySplit(digits.train.x[keep], digits.train.y[keep]))
    with pytest.raises(ValidationFailed) as err:
        validate_dataset(bad)
    assert {f["column"] for f in err.value.failures} == {"fraction"}


def test_pixel_range_and_small_split_fail(digits):
    x = digits.val.x.copy()
    x[0] *= 255.0
    bad = dataclasses.replace(digits, val=ArraySplit(x, digits.val.y))
    with pytest.raises(ValidationFailed) as err:
        validate_dataset(bad, min_split_size=400)
    cols = {f["column"] for f in err.value.failures}
    assert {"max", "split_size"} <= cols


def test_live_batch_suite(digits):
    assert validate_batch(digits.test.x[:20], (1, 8, 8)).success
    x = digits.test.x[:20].copy()
    x[0, 0, 0, 0] = np.inf
    with pytest.raises(ValidationFailed) as err:
        validate_batch(x, (1, 8, 8))
    assert "n_nonfinite" in {f["column"] for f in err.value.failures}
    with pytest.raises(ValidationFailed) as err:
        validate_batch(np.zeros((2, 3, 8, 8), dtype=np.float32), (1, 8, 8))
    assert "channels" in {f["column"] for f in err.value.failures}

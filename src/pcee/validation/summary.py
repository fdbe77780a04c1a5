"""Per-sample summary frame: GX validates tables, so image arrays are validated through one row
per sample (label, shape, pixel statistics, non-finite count, split)."""

from __future__ import annotations

import numpy as np
import pandas as pd

SUMMARY_COLUMNS = ("label", "height", "width", "channels", "min", "max", "mean", "n_nonfinite", "split")


def summarize_array(x: np.ndarray, y: np.ndarray | None = None, split: str = "live") -> pd.DataFrame:
    """One row per sample of ``x`` (N, C, H, W); ``label`` is -1 where no labels are given."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got an array of shape {x.shape}")
    n, c, h, w = x.shape
    flat = x.reshape(n, -1).astype(np.float64, copy=False)
    finite = np.isfinite(flat)
    # statistics over the finite pixels only; the non-finite count is its own column
    masked = np.where(finite, flat, np.nan)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows give NaN stats
            mins, maxs, means = np.nanmin(masked, axis=1), np.nanmax(masked, axis=1), np.nanmean(masked, axis=1)
    labels = np.full(n, -1, dtype=np.int64) if y is None else np.asarray(y).astype(np.int64)
    return pd.DataFrame(
        {
            "label": labels,
            "height": np.full(n, h, dtype=np.int64),
            "width": np.full(n, w, dtype=np.int64),
            "channels": np.full(n, c, dtype=np.int64),
            "min": mins,
            "max": maxs,
            "mean": means,
            "n_nonfinite": (~finite).sum(axis=1).astype(np.int64),
            "split": np.full(n, split, dtype=object),
        },
        # pandas-stubs' SequenceNotStr rejects every list here (its index() signature vs typeshed's list.index)
        columns=list(SUMMARY_COLUMNS),  # pyright: ignore[reportArgumentType]
    )


def summarize_splits(splits) -> pd.DataFrame:
    """Summary frame of a ``DatasetSplits`` (train, val, test stacked, with the split column)."""
    frames = [
        summarize_array(getattr(splits, name).x, getattr(splits, name).y, name) for name in ("train", "val", "test")
    ]
    return pd.concat(frames, ignore_index=True)

"""Deterministic, stratified, disjoint index splits from a seed.

Everything here works on label arrays only, so a loader can choose which samples it needs before
it decodes any image (a 2k-sample experiment on a 30k-JPEG tree decodes 2k files, not 30k).
"""

from __future__ import annotations

import numpy as np


def resolve_size(size: int | float, pool: int, what: str) -> int:
    """Turn a size (an int count, or a float fraction in (0, 1) of ``pool``) into a count.

    Raises ValueError naming ``what`` when the size is not usable for a pool of ``pool`` samples.
    """
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be an int count or a float fraction in (0, 1), got {size!r}")
    if isinstance(size, (float, np.floating)):
        if not 0.0 < float(size) < 1.0:
            raise ValueError(f"{what} as a fraction must be in (0, 1), got {size}")
        count = int(round(float(size) * pool))
    else:
        count = int(size)
    if not 1 <= count <= pool:
        raise ValueError(f"{what}={size!r} gives {count} samples; it must be between 1 and {pool}")
    return count


def stratified_take(
    y: np.ndarray, pool: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``count`` indices out of ``pool`` with class proportions kept (largest remainder).

    Returns (taken, rest), both sorted, disjoint, and together equal to ``pool``.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if count > len(pool):
        raise ValueError(f"cannot take {count} samples from a pool of {len(pool)}")
    labels = y[pool]
    classes, class_counts = np.unique(labels, return_counts=True)
    exact = count * class_counts / len(pool)
    quota = np.floor(exact).astype(np.int64)
    # Hand the leftover samples to the classes with the largest fractional parts; ties go to
    # the lower class index (stable sort), so the allocation is a pure function of the labels.
    leftover = count - int(quota.sum())
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:leftover]] += 1
    taken = []
    for cls, q in zip(classes, quota, strict=True):
        members = pool[labels == cls]
        taken.append(members[rng.permutation(len(members))[:q]])
    taken_idx = np.sort(np.concatenate(taken)) if taken else np.empty(0, np.int64)
    rest = np.setdiff1d(pool, taken_idx, assume_unique=True)
    return taken_idx, rest


def split_indices(
    y: np.ndarray,
    seed: int,
    val_size: int | float,
    test_size: int | float | None,
    train_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Split one labelled pool into disjoint, sorted train/val/test index arrays.

    ``test_size=None`` means the caller has its own test set: only train and val are carved
    (the returned ``test`` is empty). ``train_size`` caps the training split (stratified subset of
    what is left after val and test). The same (labels, seed, sizes) give the same indices.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    pool = np.arange(len(y), dtype=np.int64)
    if test_size is None:
        test = np.empty(0, np.int64)
    else:
        test, pool = stratified_take(y, pool, resolve_size(test_size, len(y), "test_size"), rng)
    # Fractions are of the whole pool, so val_size=0.2, test_size=0.2 means 60/20/20.
    n_val = resolve_size(val_size, len(y), "val_size")
    if n_val >= len(pool):
        raise ValueError(f"val_size={val_size!r} ({n_val} samples) leaves no training data out of {len(pool)}")
    val, train = stratified_take(y, pool, n_val, rng)
    if train_size is not None:
        if isinstance(train_size, bool) or not isinstance(train_size, (int, np.integer)) or train_size < 1:
            raise ValueError(f"train_size must be a positive int (a cap), got {train_size!r}")
        if train_size < len(train):
            train, _ = stratified_take(y, train, int(train_size), rng)
    return {"train": train, "val": val, "test": test}


def stratified_subset(y: np.ndarray, size: int | float, seed: int, what: str) -> np.ndarray:
    """Sorted indices of a deterministic stratified subset of ``size`` samples (a cap)."""
    n = len(y)
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size >= n:
        return np.arange(n, dtype=np.int64)
    count = resolve_size(size, n, what)
    taken, _ = stratified_take(np.asarray(y), np.arange(n, dtype=np.int64), count, np.random.default_rng(seed))
    return taken

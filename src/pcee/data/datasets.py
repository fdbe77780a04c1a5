"""Datasets as in-memory arrays with deterministic, disjoint train/val/test splits.

Names (see ``DATASET_NAMES``):

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 real images, always available; the
  default). Pixels 0..16 are scaled to [0, 1]; shape (1, 8, 8). Test and val are carved from the
  one pool.
- ``cifar10`` / ``cifar100``: torchvision's classes on a local ``root`` (``download=False``).
  The official test set is the test split; val is carved from the official training set.
- ``imagefolder:<path>``: ``<path>/train`` and ``<path>/test`` ImageFolder trees (val carved
  from train), or a single tree from which test is carved too.
- ``prepared:<dir>``: a snapshot written by :func:`pcee.data.prepared.save_prepared`.

Splits are stratified and a pure function of (labels, seed, sizes). The validation split is held
out from training by construction: it is carved first and the training split is what is left.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from pcee.data.cifar import load_cifar_arrays
from pcee.data.imagefolder import LAYOUT, image_mode, read_images, scan_tree
from pcee.data.prepared import load_prepared
from pcee.data.splits import split_indices, stratified_subset
from pcee.data.types import ArraySplit, DatasetSplits

DATASET_NAMES = ("digits", "cifar10", "cifar100", "imagefolder", "prepared")
# How each name is written on the command line (for error messages and help).
DATASET_FORMS = ("digits", "cifar10", "cifar100", "imagefolder:<path>", "prepared:<dir>")
DEFAULT_VAL_SIZE = 0.2
DEFAULT_TEST_SIZE = 0.2  # only where a dataset has no test split of its own


# --- sources: labels first, pixels only for the indices a split needs -----------------------


@dataclass(frozen=True)
class _Pool:
    labels: np.ndarray  # (N,) int64
    fetch: Callable[[np.ndarray], np.ndarray]  # indices -> float32 (n, C, H, W) in [0, 1]


def _uint8_hwc_to_float(x: np.ndarray) -> np.ndarray:
    # (N, H, W, C) uint8 -> (N, C, H, W) float32 in [0, 1]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def _array_pool(x_hwc: np.ndarray, y: np.ndarray) -> _Pool:
    return _Pool(labels=y, fetch=lambda idx: _uint8_hwc_to_float(x_hwc[idx]))


def _digits_source() -> tuple[_Pool, None, list[str]]:
    from sklearn.datasets import load_digits
    from sklearn.utils import Bunch

    bunch = cast(Bunch, load_digits())  # the stub also allows the (data, target) pair of return_X_y=True
    # (1797, 64) values 0..16 -> (N, 1, 8, 8) in [0, 1]
    x = (bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    return _Pool(labels=y, fetch=lambda idx: x[idx]), None, [str(c) for c in bunch.target_names]


def _cifar_source(name: str, root: str | None) -> tuple[_Pool, _Pool, list[str]]:

    train_x, train_y, test_x, test_y, classes = load_cifar_arrays(name, root)
    return _array_pool(train_x, train_y), _array_pool(test_x, test_y), classes


def _imagefolder_source(path: str | None) -> tuple[_Pool, _Pool | None, list[str]]:

    if not path:
        raise ValueError(f"imagefolder needs a path: imagefolder:<path>, laid out as {LAYOUT}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder: {root} does not exist or is not a directory; expected {LAYOUT}")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_test and not has_train:
        raise FileNotFoundError(f"imagefolder: {root} has test/ but no train/; expected {LAYOUT}")
    trees = (
        [scan_tree(root / "train"), scan_tree(root / "test")]
        if has_test
        else [scan_tree(root / "train" if has_train else root)]
    )
    if len(trees) == 2 and trees[0].classes != trees[1].classes:
        raise ValueError(
            f"imagefolder: train/ and test/ under {root} have different class folders: "
            f"{trees[0].classes} vs {trees[1].classes}"
        )
    mode = image_mode(trees[0].paths[0])

    def pool(tree):
        return _Pool(
            labels=tree.labels, fetch=lambda idx: _uint8_hwc_to_float(read_images([tree.paths[i] for i in idx], mode))
        )

    return pool(trees[0]), (pool(trees[1]) if len(trees) == 2 else None), trees[0].classes


def parse_name(name: str, root: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """Split ``kind:arg`` into (kind, arg); ``imagefolder``/``prepared`` may take ``root`` instead.

    Raises ValueError listing the valid names for an unknown kind.
    """
    kind, sep, arg = str(name).partition(":")
    kind = kind.strip().lower()
    if kind not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_FORMS)}")
    if sep and kind not in ("imagefolder", "prepared"):
        raise ValueError(
            f"dataset {kind!r} takes no ':<path>' part (use root=/--root); valid names: {', '.join(DATASET_FORMS)}"
        )
    value = arg if sep else (None if root is None else os.fspath(root))
    return kind, value


def load_dataset(
    name: str = "digits",
    root: str | os.PathLike | None = None,
    seed: int = 0,
    val_size: int | float | None = None,
    test_size: int | float | None = None,
    train_size: int | None = None,
) -> DatasetSplits:
    """Load a dataset by name and split it deterministically into train/val/test.

    Parameters
    ----------
    name : one of ``digits``, ``cifar10``, ``cifar100``, ``imagefolder:<path>``, ``prepared:<dir>``.
    root : the local data root for cifar10/cifar100 (the directory holding ``cifar-10-batches-py``
        / ``cifar-100-python``); the path for imagefolder/prepared when the name has none.
    seed : seed of the split (same seed and sizes -> same samples in each split).
    val_size : validation size, an int count or a fraction of the pool it is carved from
        (the whole dataset, or the training set where a test set exists); default 0.2.
    test_size : where the dataset has no test split, the size carved for test (default 0.2);
        where it has one, an optional cap (deterministic stratified subset of it).
    train_size : optional cap on the training split (deterministic stratified subset).

    A ``prepared`` snapshot has fixed splits: ``val_size`` is refused, the caps apply.
    """
    kind, arg = parse_name(name, root)
    if kind == "prepared":
        if not arg:
            raise ValueError("prepared needs a directory: prepared:<dir>")
        if val_size is not None:
            raise ValueError("a prepared snapshot has fixed splits; val_size cannot change them")
        return load_prepared(arg, train_size=train_size, test_size=test_size, seed=seed)

    if kind == "digits":
        main, test_pool, classes = _digits_source()
    elif kind in ("cifar10", "cifar100"):
        main, test_pool, classes = _cifar_source(kind, None if arg is None else arg)
    else:
        main, test_pool, classes = _imagefolder_source(arg)
        name = f"imagefolder:{arg}"

    val_size = DEFAULT_VAL_SIZE if val_size is None else val_size
    if test_pool is None:
        idx = split_indices(
            main.labels, seed, val_size, DEFAULT_TEST_SIZE if test_size is None else test_size, train_size
        )
        test = ArraySplit(main.fetch(idx["test"]), main.labels[idx["test"]])
    else:
        idx = split_indices(main.labels, seed, val_size, None, train_size)
        test_idx = (
            np.arange(len(test_pool.labels), dtype=np.int64)
            if test_size is None
            else stratified_subset(test_pool.labels, test_size, seed, "test_size")
        )
        test = ArraySplit(test_pool.fetch(test_idx), test_pool.labels[test_idx])
    train = ArraySplit(main.fetch(idx["train"]), main.labels[idx["train"]])
    val = ArraySplit(main.fetch(idx["val"]), main.labels[idx["val"]])
    info = {
        "source": kind if kind != "imagefolder" else name,
        "seed": int(seed),
        "val_size": val_size,
        "test_size": test_size,
        "train_size": train_size,
    }
    channels, height, width = (int(d) for d in train.x.shape[1:])  # images are (N, C, H, W)
    return DatasetSplits(
        name=kind if kind != "imagefolder" else name,
        train=train,
        val=val,
        test=test,
        num_classes=len(classes),
        class_names=list(classes),
        input_shape=(channels, height, width),
        info=info,
    )

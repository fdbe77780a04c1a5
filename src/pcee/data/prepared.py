"""Prepared snapshots: a dataset's splits on disk, byte for byte reproducible.

Layout of ``<dir>``::

    meta.json                  name, class_names, num_classes, input_shape, sizes, provenance
    train_x.npy train_y.npy    float32 (N, C, H, W) / int64 (N,), little-endian, C order
    val_x.npy   val_y.npy
    test_x.npy  test_y.npy

DVC tracks this directory (``data/``), and a fresh clone that re-prepares must get the md5 in
``data.dvc``. So only deterministic writers are used: ``np.save`` (a fixed header plus the raw
buffer) rather than ``np.savez`` (zip entries carry timestamps), and JSON with sorted keys and
a fixed layout. The snapshot is written into a temporary sibling directory and renamed into
place, so a failure never leaves a half-written snapshot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pcee.atomic import atomic_directory
from pcee.data.splits import stratified_subset
from pcee.data.types import ArraySplit, DatasetSplits

FORMAT = "pcee-prepared-v1"
SPLIT_NAMES = ("train", "val", "test")


def _meta(splits: DatasetSplits) -> dict:
    return {
        "format": FORMAT,
        "name": splits.name,
        "num_classes": int(splits.num_classes),
        "class_names": [str(c) for c in splits.class_names],
        "input_shape": [int(d) for d in splits.input_shape],
        "sizes": {k: int(v) for k, v in splits.sizes().items()},
        "info": splits.info,
    }


def save_prepared(splits: DatasetSplits, out_dir: str | os.PathLike) -> Path:
    """Write ``splits`` to ``out_dir`` (replacing a previous snapshot there); returns the path.

    The same splits always give identical bytes in every file.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (not (out / "meta.json").is_file() and any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not a prepared snapshot; refusing to replace it")
    with atomic_directory(out) as tmp:
        for split_name in SPLIT_NAMES:
            split: ArraySplit = getattr(splits, split_name)
            np.save(tmp / f"{split_name}_x.npy", np.ascontiguousarray(split.x, dtype="<f4"), allow_pickle=False)
            np.save(tmp / f"{split_name}_y.npy", np.ascontiguousarray(split.y, dtype="<i8"), allow_pickle=False)
        text = json.dumps(_meta(splits), sort_keys=True, indent=2, ensure_ascii=True) + "\n"
        (tmp / "meta.json").write_text(text, encoding="utf-8")
    return out


def load_prepared(
    in_dir: str | os.PathLike,
    train_size: int | None = None,
    test_size: int | float | None = None,
    seed: int = 0,
) -> DatasetSplits:
    """Read a snapshot written by :func:`save_prepared` (optionally capping train/test)."""
    root = Path(in_dir).expanduser()
    meta_path = root / "meta.json"
    expected = "meta.json and {train,val,test}_{x,y}.npy written by `pcee data prepare`"
    if not meta_path.is_file():
        raise FileNotFoundError(f"prepared: no snapshot at {root} (missing meta.json); expected {expected}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"prepared: {meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    parts = {}
    for split_name in SPLIT_NAMES:
        arrays = []
        for suffix in ("x", "y"):
            path = root / f"{split_name}_{suffix}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"prepared: {path} is missing; expected {expected}")
            arrays.append(np.load(path, allow_pickle=False))
        x, y = arrays
        cap = train_size if split_name == "train" else test_size if split_name == "test" else None
        if cap is not None:
            keep = stratified_subset(y, cap, seed, f"{split_name}_size")
            x, y = x[keep], y[keep]
        parts[split_name] = ArraySplit(x, y)
    info = dict(meta.get("info", {}))
    info["prepared_from"] = str(root)
    return DatasetSplits(
        name=meta["name"],
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        num_classes=int(meta["num_classes"]),
        class_names=list(meta["class_names"]),
        input_shape=tuple(meta["input_shape"]),
        info=info,
    )

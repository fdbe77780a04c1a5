"""The data types every loader returns: one split of arrays, and a dataset's three splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ArraySplit:
    """One split: images ``x`` float32 (N, C, H, W) in [0, 1] and labels ``y`` int64 (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"y must be ({self.x.shape[0]},), got shape {self.y.shape}")
        if self.x.dtype != np.float32 or self.y.dtype != np.int64:
            raise ValueError(f"x must be float32 and y int64, got {self.x.dtype} and {self.y.dtype}")

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class DatasetSplits:
    """Train/val/test splits of one dataset plus what a model needs to know about it.

    ``info`` records provenance (source name, seed, sizes) and is written into prepared snapshots.
    """

    name: str
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, int, int]  # (C, H, W)
    info: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

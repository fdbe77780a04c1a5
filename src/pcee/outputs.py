"""The outputs contract: what training writes and calibration (and other tools) read.

A directory with ``val.npz`` and ``test.npz``, each holding ``logits`` float32 (N, L, K) (every
exit's logits for every sample), ``labels`` int64 (N,), ``flops`` float64 (L,) (cumulative cost
F_l), plus ``meta.json`` (dataset, model, config, data version). See docs/architecture.md
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcee.atomic import atomic_directory

SPLITS = ("val", "test")


@dataclass(frozen=True)
class ExitOutputs:
    """Every exit's logits for a set of samples, with labels and cumulative per-exit FLOPs."""

    logits: np.ndarray  # (N, L, K) float32
    labels: np.ndarray  # (N,) int64
    flops: np.ndarray  # (L,) float64, cumulative F_l

    def __post_init__(self) -> None:
        if self.logits.ndim != 3:
            raise ValueError(f"logits must be (N, L, K), got shape {self.logits.shape}")
        n, num_exits, _ = self.logits.shape
        if self.labels.shape != (n,):
            raise ValueError(f"labels must be ({n},), got shape {self.labels.shape}")
        if self.flops.shape != (num_exits,):
            raise ValueError(f"flops must be ({num_exits},), got shape {self.flops.shape}")

    @property
    def num_exits(self) -> int:
        return self.logits.shape[1]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]

    def __len__(self) -> int:
        return self.logits.shape[0]

    def subset(self, index: np.ndarray) -> ExitOutputs:
        return ExitOutputs(self.logits[index], self.labels[index], self.flops)

    def with_cost(self, cost: np.ndarray) -> ExitOutputs:
        """These outputs with another cumulative per-exit cost (L,) where FLOPs stood, e.g. a measured
        latency profile (:func:`pcee.latency.cost_vector`): what sweeps and operating points then count."""
        return ExitOutputs(self.logits, self.labels, np.asarray(cost, dtype=np.float64))

    def save(self, path: str | os.PathLike) -> None:
        np.savez(
            path,
            logits=self.logits.astype(np.float32),
            labels=self.labels.astype(np.int64),
            flops=self.flops.astype(np.float64),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExitOutputs:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no outputs file at {path} (expected val.npz/test.npz with logits, labels, flops)")
        with np.load(path, allow_pickle=False) as z:
            missing = {"logits", "labels", "flops"} - set(z.files)
            if missing:
                raise ValueError(f"{path} lacks arrays {sorted(missing)}")
            return cls(
                logits=z["logits"].astype(np.float32),
                labels=z["labels"].astype(np.int64),
                flops=z["flops"].astype(np.float64),
            )


def write_outputs_dir(
    out_dir: str | os.PathLike,
    splits: dict[str, ExitOutputs],
    meta: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write the contract atomically: into a temporary sibling directory, then rename.

    ``extra_files`` maps a file name to an existing file to copy in (e.g. weights, config).
    A failure leaves no half-written ``out_dir``; an existing ``out_dir`` is replaced only at the end.
    """
    with atomic_directory(out_dir) as tmp:
        for name, outputs in splits.items():
            outputs.save(tmp / f"{name}.npz")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, tmp / name)
    return Path(out_dir)


def read_outputs_dir(out_dir: str | os.PathLike) -> tuple[dict[str, ExitOutputs], dict[str, Any]]:
    """Read ``val`` and ``test`` outputs and ``meta.json`` from a contract directory."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"outputs directory {out_dir} does not exist")
    splits = {name: ExitOutputs.load(out_dir / f"{name}.npz") for name in SPLITS}
    meta_path = out_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return splits, meta

"""Evaluate a bundle on the gate's evaluation rows with the library's early-exit runner."""

from __future__ import annotations

import numpy as np

from pcee.registry.gate import Evaluation


def evaluate_bundle(bundle_dir, x: np.ndarray, y: np.ndarray, version: str | None = None) -> Evaluation:
    from pcee.bundle import ModelBundle

    result = ModelBundle.load(bundle_dir).runner().run(np.ascontiguousarray(x, dtype=np.float32))
    pred = np.asarray(result.prediction)
    return Evaluation(version=version, accuracy=float((pred == np.asarray(y)).mean()), mean_flops=float(np.mean(result.flops)), n=int(len(y)))

"""Evaluate a bundle on the gate's rows with the library's early-exit runner."""

from __future__ import annotations

import numpy as np

from pcee.bundle import ModelBundle
from pcee.calibration.bounds import loss_upper_bound
from pcee.latency import LatencyProfile
from pcee.registry.gate import Evaluation


def bundle_predictions(bundle_dir, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prediction (N,), cumulative FLOPs spent (N,)) of a bundle's early-exit runner."""
    pred, flops, _, _ = _run(bundle_dir, x)
    return pred, flops


def _run(bundle_dir, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str | None]:
    """Predictions, FLOPs spent and, where the bundle has a latency profile, seconds spent, per sample,
    and how that profile was timed."""

    bundle = ModelBundle.load(bundle_dir)
    result = bundle.runner().run(np.ascontiguousarray(x, dtype=np.float32))
    stored = (bundle.meta or {}).get("latency_profile")
    profile = None if stored is None else LatencyProfile.from_dict(stored)
    seconds = None if profile is None else profile.cost()[np.asarray(result.exit)]
    method = None if profile is None else profile.method
    return np.asarray(result.prediction), np.asarray(result.flops, dtype=np.float64), seconds, method


def evaluate_bundle(
    bundle_dir,
    x: np.ndarray,
    y: np.ndarray,
    version: str | None = None,
    *,
    risk: float | None = None,
    bound: str | None = None,
    test_x: np.ndarray | None = None,
    test_y: np.ndarray | None = None,
) -> Evaluation:
    """Accuracy and mean FLOPs on (x, y); with ``risk`` and ``bound`` also the (1 - risk) lower bound on
    the accuracy; with ``test_x``/``test_y`` the test accuracy, as a check."""

    pred, flops, seconds, method = _run(bundle_dir, x)
    wrong = (pred != np.asarray(y)).astype(np.float64)
    lower = None if bound is None else float(1.0 - loss_upper_bound(wrong, float(risk), bound)[0])  # type: ignore[arg-type]
    test_acc = None
    if test_x is not None and test_y is not None and len(test_y):
        test_acc = float((bundle_predictions(bundle_dir, test_x)[0] == np.asarray(test_y)).mean())
    return Evaluation(
        version=version,
        accuracy=float(1.0 - wrong.mean()),
        mean_flops=float(flops.mean()),
        mean_latency_s=None if seconds is None else float(seconds.mean()),
        latency_method=method,
        n=int(len(y)),
        accuracy_lower_bound=lower,
        test_accuracy=test_acc,
    )

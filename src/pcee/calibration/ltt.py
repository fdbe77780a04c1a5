"""Learn-then-Test, the math alone: the fit/calibrate split, the PCEE rule's exits in closed form,
the fixed sequence, and the checks on α, η and the calibrate size.

A leaf of the library (numpy, the bounds of :mod:`pcee.calibration.bounds` and the seeded split of
:mod:`pcee.data.splits`): the operating-point pipeline (:mod:`pcee.operating_point`), the self-
certifying policy (:mod:`pcee.policies.risk_controlled`), the answer rule (:mod:`pcee.selective`), the
sweep and the recalibration all build on it, and it imports none of them.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from pcee.calibration.bounds import check_bound, loss_upper_bound
from pcee.data.splits import stratified_take

#: default risk η: P(accuracy < α) <= η over calibration draws
DEFAULT_RISK = 0.1
#: default bound; chosen by benchmarks/target_guarantee.py (tightest with miss rate <= η)
DEFAULT_BOUND = "clopper-pearson"
#: default share of the validation outputs held out to calibrate (choose and bound)
DEFAULT_CALIBRATE_FRACTION = 0.5
#: below this many calibrate rows the bound costs several points of accuracy: warn
SMALL_CALIBRATION = 500


# ---------------------------------------------------------------------------------------------
# data roles
# ---------------------------------------------------------------------------------------------
def check_target(target_accuracy: float | None, risk: float) -> None:
    """ValueError unless α and η are numbers in (0, 1)."""
    for name, value in (("target_accuracy", target_accuracy), ("risk", risk)):
        if value is None and name == "target_accuracy":
            continue
        try:
            v = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from None
        if not (math.isfinite(v) and 0.0 < v < 1.0):
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def calibrate_size(n_val: int, calibrate_fraction: float = DEFAULT_CALIBRATE_FRACTION) -> int:
    """Number of calibrate rows the split gives for ``n_val`` validation rows."""
    if not 0.0 < float(calibrate_fraction) < 1.0:
        raise ValueError(f"calibrate_fraction must be in (0, 1), got {calibrate_fraction!r}")
    return int(round(float(calibrate_fraction) * int(n_val)))


def best_possible_accuracy(n_calibrate: int, risk: float, bound: str = DEFAULT_BOUND) -> float:
    """The highest α any point can certify with ``n_calibrate`` rows: zero errors, bound at η."""
    if n_calibrate <= 0:
        return 0.0
    return float(1.0 - loss_upper_bound(np.zeros(n_calibrate), risk, bound)[0])


def check_calibration_size(
    n_val: int,
    target_accuracy: float | None,
    risk: float = DEFAULT_RISK,
    bound: str = DEFAULT_BOUND,
    calibrate_fraction: float = DEFAULT_CALIBRATE_FRACTION,
    mode: str = "certified",
) -> int:
    """Fail early (before training) when the calibrate part is too small for any certificate.

    Returns the calibrate size; warns when it is small enough that the bound costs noticeably.
    """
    check_target(target_accuracy, risk)
    check_bound(bound)
    n_cal = calibrate_size(n_val, calibrate_fraction)
    if n_cal < 1 or n_val - n_cal < 1:
        raise ValueError(
            f"calibrate_fraction={calibrate_fraction} leaves an empty fit or calibrate part of {n_val} validation rows"
        )
    if mode == "certified" and target_accuracy is not None:
        best = best_possible_accuracy(n_cal, risk, bound)
        if best < float(target_accuracy):
            raise ValueError(
                f"{n_cal} calibrate rows cannot certify accuracy {target_accuracy} at risk {risk} with the {bound} bound even "
                f"with zero errors (best possible {best:.4f}); use more validation data, a lower target or a higher risk"
            )
    if n_cal < SMALL_CALIBRATION:
        warnings.warn(
            f"only {n_cal} calibrate rows: the {bound} bound at risk {risk} alone costs about "
            f"{1.0 - best_possible_accuracy(n_cal, risk, bound):.3f} accuracy even with zero errors; the certified point "
            f"will be more conservative than a point estimate",
            UserWarning,
            stacklevel=2,
        )
    return n_cal


def split_fit_calibrate(
    n_or_labels: np.ndarray, calibrate_fraction: float = DEFAULT_CALIBRATE_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, calibrate) row indices of the validation outputs: seeded, stratified, disjoint.

    ``fit`` is sorted; ``calibrate`` is in a seeded random order (the WSR bound reads its losses as
    a sequence, which must not follow any order the rows came in).
    """
    labels = np.asarray(n_or_labels)
    n = labels.shape[0]
    n_cal = calibrate_size(n, calibrate_fraction)
    if n_cal < 1 or n - n_cal < 1:
        raise ValueError(
            f"calibrate_fraction={calibrate_fraction} leaves an empty fit or calibrate part of {n} validation rows"
        )
    rng = np.random.default_rng(int(seed))
    cal, fit = stratified_take(labels, np.arange(n, dtype=np.int64), n_cal, rng)
    return fit, cal[rng.permutation(cal.size)]


# ---------------------------------------------------------------------------------------------
# exits on a grid, the fixed sequence
# ---------------------------------------------------------------------------------------------
def running_max(map_values: np.ndarray) -> np.ndarray:
    """R (N, L-1): the running maximum of each sample's map values over the non-final exits, NaN
    read as -inf (a NaN map value never passes). PCEE(δ) leaves at the first l with R_l >= δ: at
    exit l exactly for R_{l-1} < δ <= R_l (R_{-1} = -inf, R_{L-1} = +inf). Every closed form of the
    PCEE rule (:func:`closed_form_exits`, :func:`pcee.sweep.exit_counts_closed_form`) starts here."""
    mv = np.asarray(map_values, dtype=np.float64)
    return np.maximum.accumulate(np.where(np.isnan(mv), -np.inf, mv), axis=1) if mv.shape[1] else mv


def exits_from_running_max(running: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Exits (G, N) of the PCEE rule at every threshold in ``values`` from :func:`running_max`
    (N, L-1): the number of R_l below δ."""
    return (
        (running[None, :, :] < np.asarray(values, dtype=np.float64).ravel()[:, None, None]).sum(axis=2).astype(np.int64)
    )


def closed_form_exits(map_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Exits (G, N) of the PCEE rule at every threshold in ``values`` from map values (N, L-1).

    With R the running maximum of a sample's map values (NaN never passes), the sample leaves at
    the first l with R_l >= δ, i.e. at the number of R_l below δ.
    """
    return exits_from_running_max(running_max(map_values), values)


def fixed_sequence_passes(lower_bounds: np.ndarray, target_accuracy: float) -> int:
    """How many points, in testing order, pass (lower bound >= α) before the first failure."""
    passes = np.asarray(lower_bounds) >= float(target_accuracy) - 1e-12
    return int(np.argmin(passes)) if not passes.all() else int(passes.size)

"""Risk-controlled PCEE: PCEE with a Learn-then-Test accuracy guarantee (beyond the papers).

The validation outputs are split (seeded and stratified, ``calib_fraction``; the same split as
:func:`pcee.operating_point.split_fit_calibrate`) into a *fit* part, on which the PCEE reliability
maps are fitted, and a disjoint *calibration* part (a bound computed on the data the maps were
fitted on would be biased). On the grid δ' = 1, 1 - step, ..., down to ``delta``,
tested from high to low (fixed-sequence testing, Learn-then-Test), the null hypothesis
"PCEE(δ')'s error > 1 - α" is rejected when its p-value on the calibration part is <= η, i.e. when
the (1 - η) upper confidence bound (Clopper-Pearson, Hoeffding-Bentkus or WSR) on the error is
<= 1 - α. The chosen δ' is the smallest tested before the first failure, so that with probability
>= 1 - η over calibration draws the population accuracy of PCEE(δ') is >= α.
If even δ' = 1 fails, no rule is certified: every sample goes to the final exit, ``delta_`` is
None and ``certified_`` is False.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pcee.calibration.bounds import check_bound, loss_upper_bound
from pcee.calibration.ltt import (
    closed_form_exits,
    exits_from_running_max,
    fixed_sequence_passes,
    running_max,
    split_fit_calibrate,
)
from pcee.calibration.reliability_map import ExitReliabilityMaps
from pcee.policies.estimator import check_outputs, check_unit
from pcee.policies.pcee import PCEEPolicy


class RiskControlledPCEEPolicy(PCEEPolicy):
    """Parameters
    ----------
    alpha : target accuracy in (0, 1) (the swept parameter)
    eta : risk level in (0, 1): P(population accuracy < alpha) <= eta over calibration draws
    delta : lowest δ' tested (a floor on the grid; 0 lets the test go as low as it passes)
    bound : "clopper-pearson" | "hoeffding-bentkus" | "wsr"
    calib_fraction : share of the validation outputs held out for the bound (the rest fits the maps)
    seed : seed of the fit/calibration split
    grid_step : spacing of the δ' grid
    score, n_bins, binning, min_count : as in PCEE

    Attributes
    ----------
    maps_ : maps fitted on the fit part
    grid_ : δ' tested, from 1 down;  errors_ : PCEE(δ') errors on the calibration part
    n_calib_ : calibration size;  ucb_ : upper confidence bounds on the error (G,)
    n_pass_ : how many δ' passed before the first failure
    delta_ : chosen δ' (None if none passes);  certified_ : whether one passed
    calib_running_max_, calib_correct_ : the calibration rows' running maximum of map values
        (n, L-1) and per-exit correctness (n, L), in the calibration order: every bound (WSR reads
        the losses as a sequence) and every re-selection for a new α, η or bound start from them
    """

    name = "risk-controlled"
    param_name = "alpha"
    sweeps_in_closed_form = False  # α is not a map threshold; sweep.py applies each α's certified δ' in closed form
    certifies_itself = True
    _fit_params = ("delta", "calib_fraction", "seed", "grid_step", "score", "n_bins", "binning", "min_count")

    def __init__(
        self,
        alpha: float = 0.9,
        eta: float = 0.1,
        delta: float = 0.0,
        bound: str = "clopper-pearson",
        calib_fraction: float = 0.5,
        seed: int = 0,
        grid_step: float = 0.005,
        score: str = "max_prob",
        n_bins: int = 15,
        binning: str = "equal_width",
        min_count: float = 10,
    ) -> None:
        self.alpha = alpha
        self.eta = eta
        self.bound = bound
        self.calib_fraction = calib_fraction
        self.seed = seed
        self.grid_step = grid_step
        super().__init__(delta=delta, score=score, n_bins=n_bins, binning=binning, min_count=min_count)

    def _validate_params(self) -> None:
        super()._validate_params()
        check_unit("alpha", self.alpha, low_open=True, high_open=True)
        check_unit("eta", self.eta, low_open=True, high_open=True)
        check_unit("calib_fraction", self.calib_fraction, low_open=True, high_open=True)
        check_unit("grid_step", self.grid_step, low_open=True)
        check_bound(self.bound)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @classmethod
    def default_grid(cls) -> np.ndarray:
        return np.round(np.arange(100, 200) * 0.005, 3)  # target accuracies 0.5 .. 0.995

    @classmethod
    def sweep_grid(cls, deltas: np.ndarray) -> np.ndarray | None:
        inner = deltas[(deltas > 0) & (deltas < 1)]  # α is a target in (0, 1)
        return inner if inner.size else None

    def _delta_grid(self) -> np.ndarray:
        grid = 1.0 - float(self.grid_step) * np.arange(
            int(np.floor((1.0 - float(self.delta)) / float(self.grid_step) + 1e-9)) + 1
        )
        return np.round(grid, 10)

    def fit(
        self,
        logits: np.ndarray,
        labels: np.ndarray,
        flops: np.ndarray | None = None,
        sample_weight: np.ndarray | None = None,
    ) -> RiskControlledPCEEPolicy:
        """Split, fit maps on one part, test δ' on the other (sample_weight applies to the map fit)."""

        self._validate_params()
        logits, labels, flops = check_outputs(logits, labels, flops)
        fit, cal = split_fit_calibrate(labels, float(self.calib_fraction), int(self.seed))
        weights = None if sample_weight is None else np.asarray(sample_weight)[fit]
        self.maps_ = self._make_maps().fit(logits[fit], labels[fit], weights)
        self.num_exits_ = logits.shape[1]
        self.grid_ = self._delta_grid()
        self.certify(logits[cal], labels[cal])
        return self

    def certify(self, logits: np.ndarray, labels: np.ndarray) -> RiskControlledPCEEPolicy:
        """(Re)run the fixed-sequence test of δ' on held-out rows with the maps as they are now.

        Recalibration calls this after refitting the maps, so the served δ' is always the
        certified point of the served maps. ``logits`` (n, L, K) and ``labels`` (n,) must not
        have been used to fit the maps.
        """
        self._check_fitted()
        logits, labels, _ = check_outputs(logits, labels)

        mv = self.map_values(logits)
        self.calib_running_max_ = running_max(mv)
        self.calib_correct_ = logits.argmax(axis=-1) == labels[:, None]
        self.n_calib_ = int(labels.shape[0])
        self._select()
        return self

    def exits_on_own_grid(self, logits: np.ndarray) -> np.ndarray:
        """Exits (G, N) of PCEE(δ') for every δ' of ``grid_`` (closed form on the running maximum)."""

        return closed_form_exits(self.map_values(logits), self.grid_)

    def _calib_losses(self) -> np.ndarray:

        exits = exits_from_running_max(self.calib_running_max_, self.grid_)  # (G, n)
        return ~self.calib_correct_[np.arange(self.n_calib_)[None, :], exits]

    def _select(self) -> None:
        """Fixed-sequence test from δ' = 1 downward; keeps the last δ' before the first failure."""
        losses = self._calib_losses()
        self.errors_ = losses.sum(axis=1).astype(np.int64)
        self.ucb_ = loss_upper_bound(losses.astype(np.float64), float(self.eta), self.bound)

        self.n_pass_ = fixed_sequence_passes(1.0 - self.ucb_, float(self.alpha))
        self.certified_ = self.n_pass_ > 0
        self.delta_ = float(self.grid_[self.n_pass_ - 1]) if self.n_pass_ > 0 else None

    def _params_changed(self, changed: set[str]) -> None:
        # alpha, eta and bound only change the selection, not the maps or the calibration rows
        if self.is_fitted and changed & {"alpha", "eta", "bound"}:
            self._select()

    def served_threshold(self) -> float:
        self._check_fitted()
        return float("inf") if self.delta_ is None else self.delta_

    def _get_state(self) -> dict[str, Any]:
        return {
            "num_exits": int(self.num_exits_),
            "maps": self.maps_.to_dict(),
            "grid": self.grid_.tolist(),
            "n_calib": int(self.n_calib_),
            # -inf (a NaN map value) is stored as -1: no δ' in [0, 1] lies below it either way
            "calib_running_max": np.maximum(self.calib_running_max_, -1.0).tolist(),
            "calib_correct": self.calib_correct_.astype(np.int8).tolist(),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self.num_exits_ = int(state["num_exits"])
        self.maps_ = ExitReliabilityMaps.from_dict(state["maps"])
        self.grid_ = np.asarray(state["grid"], dtype=np.float64)
        self.n_calib_ = int(state["n_calib"])
        self.calib_running_max_ = np.asarray(state["calib_running_max"], dtype=np.float64).reshape(
            self.n_calib_, self.num_exits_ - 1
        )
        self.calib_correct_ = np.asarray(state["calib_correct"], dtype=bool).reshape(self.n_calib_, self.num_exits_)
        self._select()

"""Reliability maps: confidence score -> expected accuracy of samples like it (docs/architecture.md).

A :class:`ReliabilityMap` bins one exit's confidence scores on validation data and stores, per
bin, the (weighted) accuracy and count. :class:`ExitReliabilityMaps` holds one map per exit of a
multi-exit network and reads/writes plain JSON (edges, acc, counts per exit) so that any tool can
use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression

from pcee.atomic import to_jsonable, write_json_atomic
from pcee.calibration.scores import check_score, confidence

BINNINGS = ("equal_width", "equal_mass")
SMOOTHINGS = (None, "kernel")


class ReliabilityMap:
    """Binned map from a confidence score in [0, 1] to expected accuracy.

    Parameters
    ----------
    n_bins : int
        Number of bins B (default 15).
    binning : {"equal_width", "equal_mass"}
        ``equal_width``: edges ``linspace(0, 1, B+1)`` and bin index ``min(floor(s*B), B-1)``.
        ``equal_mass``: interior edges are weighted quantiles of the fitted scores (inverted CDF:
        edge q is the smallest score whose cumulative weight fraction reaches q); a score s falls
        in bin ``b = #{interior edges <= s}``, i.e. bins are ``[e_b, e_{b+1})``. Tied scores at a
        quantile can leave a bin empty.
    min_count : float
        Plain maps (``smoothing=None``): bins whose (weighted) count is below ``min_count`` get
        accuracy 0, so PCEE never exits there. Ignored by the smoothed map.
    smoothing : {None, "kernel"}
        ``"kernel"`` is the PCEE-WS map. *This definition is ours* (the paper names a smoothing
        variant without a formula): per bin centre c_j, a count-weighted Gaussian-kernel
        Nadaraya-Watson estimate ``sum_b n_b K_h(c_j - c_b) acc_b / sum_b n_b K_h(c_j - c_b)``
        over the non-empty bins, with bandwidth h, then isotonic regression (scikit-learn,
        non-decreasing in confidence, the bin counts as weights, values clipped outside the fitted
        range). The result is defined for every bin, even empty ones, and monotone.
    bandwidth : float
        Kernel bandwidth h for ``smoothing="kernel"`` (default 0.05, in score units).

    Attributes (after ``fit``)
    --------------------------
    edges_ : (B+1,) bin edges, edges_[0] = 0 and edges_[-1] = 1
    acc_ : (B,) the map: expected accuracy per bin (after min_count or smoothing)
    raw_acc_ : (B,) plain weighted accuracy per bin (0 where the bin is empty)
    counts_ : (B,) weighted sample count per bin (the plain count when no sample_weight)
    """

    def __init__(
        self,
        n_bins: int = 15,
        binning: str = "equal_width",
        min_count: float = 10,
        smoothing: str | None = None,
        bandwidth: float = 0.05,
    ) -> None:
        self.n_bins = n_bins
        self.binning = binning
        self.min_count = min_count
        self.smoothing = smoothing
        self.bandwidth = bandwidth
        self._validate_params()

    # -- scikit-learn estimator protocol ---------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {
            "n_bins": self.n_bins,
            "binning": self.binning,
            "min_count": self.min_count,
            "smoothing": self.smoothing,
            "bandwidth": self.bandwidth,
        }

    def set_params(self, **params: Any) -> ReliabilityMap:
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"unknown ReliabilityMap parameter {key!r}; valid: {', '.join(valid)}")
            setattr(self, key, value)
        self._validate_params()
        return self

    def _validate_params(self) -> None:
        if isinstance(self.n_bins, bool) or not isinstance(self.n_bins, (int, np.integer)) or self.n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {self.n_bins!r}")
        if self.binning not in BINNINGS:
            raise ValueError(f"unknown binning {self.binning!r}; valid: {', '.join(BINNINGS)}")
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"unknown smoothing {self.smoothing!r}; valid: None, 'kernel'")
        if not np.isfinite(self.min_count) or self.min_count < 0:
            raise ValueError(f"min_count must be >= 0, got {self.min_count!r}")
        if not np.isfinite(self.bandwidth) or self.bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0, got {self.bandwidth!r}")

    def fit(self, scores: np.ndarray, correct: np.ndarray, sample_weight: np.ndarray | None = None) -> ReliabilityMap:
        """Fit on confidence scores (N,) in [0, 1] and correctness (N,) (bool or 0/1).

        ``sample_weight`` (N,) >= 0 weights each row (e.g. recent feedback over old validation
        rows in online recalibration); counts_ are then weighted counts.
        """
        self._validate_params()
        s = np.asarray(scores, dtype=np.float64).ravel()
        c = np.asarray(correct, dtype=np.float64).ravel()
        if s.shape != c.shape:
            raise ValueError(f"scores and correct must have the same length, got {s.shape[0]} and {c.shape[0]}")
        if s.size == 0:
            raise ValueError("cannot fit a reliability map on zero samples")
        if not np.all(np.isfinite(s)):
            raise ValueError("scores contain non-finite values")
        w = np.ones_like(s) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()
        if w.shape != s.shape:
            raise ValueError(f"sample_weight must have length {s.shape[0]}, got {w.shape[0]}")
        if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
            raise ValueError("sample_weight must be finite, >= 0 and not all zero")
        s = np.clip(s, 0.0, 1.0)
        b = int(self.n_bins)
        if self.binning == "equal_width":
            edges = np.linspace(0.0, 1.0, b + 1)
        else:
            edges = _weighted_quantile_edges(s, w, b)
        self.edges_ = edges
        idx = self._bin_index(s)
        self.counts_ = np.bincount(idx, weights=w, minlength=b).astype(np.float64)
        hits = np.bincount(idx, weights=w * c, minlength=b)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.raw_acc_ = np.where(self.counts_ > 0, hits / np.where(self.counts_ > 0, self.counts_, 1.0), 0.0)
        if self.smoothing == "kernel":
            self.acc_ = _smooth_isotonic(self.centres_, self.raw_acc_, self.counts_, float(self.bandwidth))
        else:
            self.acc_ = np.where(self.counts_ >= self.min_count, self.raw_acc_, 0.0)
            self.acc_ = np.where(self.counts_ > 0, self.acc_, 0.0)
        return self

    def refit_with(self, scores: np.ndarray, correct: np.ndarray, weight: float) -> ReliabilityMap:
        """A new map on this map's edges: this map's bin evidence plus recent rows weighted ``weight``.

        ``scores`` (N,) are clipped to [0, 1]; ``correct`` (N,) is 0/1 or a probability. Per bin,
        the raw accuracy is (n_old * acc_old + weight * hits) / (n_old + weight * m) for m recent
        rows, and the counts are the effective counts n_old + m (each recent row counts once for
        ``min_count``). Kernel smoothing (PCEE-WS) smooths with the weighted counts. This map is
        left as it is.
        """
        self._check_fitted()
        scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
        correct = np.asarray(correct, dtype=np.float64)
        n_old = np.asarray(self.counts_, dtype=np.float64)
        acc_old = np.asarray(self.raw_acc_, dtype=np.float64)
        nb = len(n_old)
        idx = self.bin_index(scores)
        m = np.bincount(idx, minlength=nb).astype(np.float64)  # recent rows per bin
        hits = np.bincount(idx, weights=correct, minlength=nb)
        weighted = n_old + weight * m
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = np.where(weighted > 0, (n_old * acc_old + weight * hits) / np.where(weighted > 0, weighted, 1.0), 0.0)
        effective = n_old + m
        new = ReliabilityMap(**self.get_params())
        new.edges_ = np.asarray(self.edges_, dtype=np.float64).copy()
        new.raw_acc_ = raw
        new.counts_ = effective
        if new.smoothing == "kernel":
            new.acc_ = _smooth_isotonic(new.centres_, raw, weighted, float(new.bandwidth))
        else:
            new.acc_ = np.where((effective >= new.min_count) & (effective > 0), raw, 0.0)
        return new

    @property
    def centres_(self) -> np.ndarray:
        self._check_fitted()
        return 0.5 * (self.edges_[:-1] + self.edges_[1:])

    def _check_fitted(self) -> None:
        if not hasattr(self, "edges_"):
            raise NotFittedError("this ReliabilityMap is not fitted yet; call fit(scores, correct) first")

    def _bin_index(self, scores: np.ndarray) -> np.ndarray:
        b = int(self.n_bins)
        s = np.asarray(scores, dtype=np.float64)
        if self.binning == "equal_width":
            idx = np.floor(s * b).astype(np.int64)
        else:
            idx = np.searchsorted(self.edges_[1:-1], s, side="right").astype(np.int64)
        # the ufuncs themselves, not np.clip: the same integers, without its Python-level dispatch
        # (this runs at every exit of every served request)
        return np.minimum(np.maximum(idx, 0), b - 1)

    def bin_index(self, scores: np.ndarray) -> np.ndarray:
        """Bin index (same shape as ``scores``) of each score (NaN counts as 0, ±inf as the end bins)."""
        self._check_fitted()
        s = np.asarray(scores, dtype=np.float64)
        if not np.isfinite(s).all():  # rare; np.nan_to_num is ~10x dearer than this check on a few scores
            s = np.nan_to_num(s, nan=0.0)
        return self._bin_index(s)

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Expected accuracy (same shape as ``scores``) of samples with these confidence scores."""
        return self.acc_[self.bin_index(scores)]

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict: params and, if fitted, edges, acc, raw_acc and counts."""
        d: dict[str, Any] = {"params": to_jsonable(self.get_params())}
        if hasattr(self, "edges_"):
            d.update(
                edges=self.edges_.tolist(),
                acc=self.acc_.tolist(),
                raw_acc=self.raw_acc_.tolist(),
                counts=self.counts_.tolist(),
            )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReliabilityMap:
        m = cls(**d.get("params", {}))
        if "edges" in d:
            m.edges_ = np.asarray(d["edges"], dtype=np.float64)
            m.acc_ = np.asarray(d["acc"], dtype=np.float64)
            m.counts_ = np.asarray(d["counts"], dtype=np.float64)
            m.raw_acc_ = np.asarray(d.get("raw_acc", d["acc"]), dtype=np.float64)
            b = int(m.n_bins)
            if m.edges_.shape != (b + 1,) or m.acc_.shape != (b,) or m.counts_.shape != (b,):
                raise ValueError(f"reliability map dict has inconsistent shapes for n_bins={b}")
        return m

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"ReliabilityMap({args})"


def _weighted_quantile_edges(s: np.ndarray, w: np.ndarray, n_bins: int) -> np.ndarray:
    order = np.argsort(s, kind="stable")
    s_sorted, cw = s[order], np.cumsum(w[order])
    cw = cw / cw[-1]
    q = np.arange(1, n_bins) / n_bins
    # inverted CDF: the smallest score whose cumulative weight reaches q (tiny slack for rounding)
    pos = np.searchsorted(cw, q - 1e-12, side="left")
    interior = s_sorted[np.clip(pos, 0, s_sorted.size - 1)]
    return np.concatenate([[0.0], interior, [1.0]])


def _smooth_isotonic(centres: np.ndarray, acc: np.ndarray, counts: np.ndarray, bandwidth: float) -> np.ndarray:
    """Count-weighted Gaussian Nadaraya-Watson over bin centres, then isotonic (non-decreasing)."""
    nonempty = counts > 0
    c_b, a_b, n_b = centres[nonempty], acc[nonempty], counts[nonempty]
    # log-domain kernel weights so that far-away bins never underflow the denominator to 0
    logk = np.log(n_b)[None, :] - 0.5 * ((centres[:, None] - c_b[None, :]) / bandwidth) ** 2
    logk -= logk.max(axis=1, keepdims=True)
    k = np.exp(logk)
    nw = (k * a_b[None, :]).sum(axis=1) / k.sum(axis=1)
    if nonempty.sum() < 2:
        return np.clip(nw, 0.0, 1.0)
    iso = IsotonicRegression(increasing=True, y_min=0.0, y_max=1.0, out_of_bounds="clip")
    iso.fit(centres[nonempty], nw[nonempty], sample_weight=counts[nonempty])
    return np.asarray(iso.predict(centres), dtype=np.float64)


class ExitReliabilityMaps:
    """One :class:`ReliabilityMap` per exit of a multi-exit network, on one confidence score.

    Maps are fitted for *every* exit l = 0..L-1 (the final exit's map gives the expected accuracy
    of samples answered there and its reliability diagram); PCEE uses the first L-1.

    Parameters are those of :class:`ReliabilityMap` plus ``score`` (one of ``SCORES``).
    After ``fit``: ``maps_`` (list of L fitted maps).
    """

    def __init__(
        self,
        score: str = "max_prob",
        n_bins: int = 15,
        binning: str = "equal_width",
        min_count: float = 10,
        smoothing: str | None = None,
        bandwidth: float = 0.05,
    ) -> None:
        self.score = check_score(score)
        self.map_params: dict[str, Any] = dict(
            n_bins=n_bins, binning=binning, min_count=min_count, smoothing=smoothing, bandwidth=bandwidth
        )
        ReliabilityMap(**self.map_params)  # validate now, not at fit time

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"score": self.score, **self.map_params}

    def fit(
        self, logits: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> ExitReliabilityMaps:
        """Fit one map per exit on logits (N, L, K) and labels (N,)."""
        logits = np.asarray(logits)
        if logits.ndim != 3:
            raise ValueError(f"logits must be (N, L, K), got shape {logits.shape}")
        labels = np.asarray(labels)
        if labels.shape != (logits.shape[0],):
            raise ValueError(f"labels must be ({logits.shape[0]},), got shape {labels.shape}")
        scores = confidence(logits, self.score)  # (N, L)
        correct = logits.argmax(axis=-1) == labels[:, None]  # (N, L)
        self.maps_ = [
            ReliabilityMap(**self.map_params).fit(scores[:, l], correct[:, l], sample_weight)
            for l in range(logits.shape[1])
        ]
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "maps_"):
            raise NotFittedError("these ExitReliabilityMaps are not fitted yet; call fit(logits, labels) first")

    def __len__(self) -> int:
        self._check_fitted()
        return len(self.maps_)

    def __getitem__(self, level: int) -> ReliabilityMap:
        self._check_fitted()
        return self.maps_[level]

    def predict_level(self, level: int, logits: np.ndarray) -> np.ndarray:
        """Map value (N,) of exit ``level`` for its logits (N, K)."""
        return self[level].predict(confidence(logits, self.score))

    def predict(self, logits: np.ndarray) -> np.ndarray:
        """Map values (N, L') for logits (N, L', K) with L' <= L (exit l uses map l)."""
        self._check_fitted()
        logits = np.asarray(logits)
        if logits.ndim != 3 or logits.shape[1] > len(self.maps_):
            raise ValueError(f"logits must be (N, L', K) with L' <= {len(self.maps_)}, got shape {logits.shape}")
        scores = confidence(logits, self.score)
        if scores.shape[1] == 0:
            return np.zeros((logits.shape[0], 0))
        return np.stack([self.maps_[l].predict(scores[:, l]) for l in range(scores.shape[1])], axis=1)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"params": to_jsonable(self.get_params())}
        if hasattr(self, "maps_"):
            d["maps"] = [m.to_dict() for m in self.maps_]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExitReliabilityMaps:
        obj = cls(**d.get("params", {}))
        if "maps" in d:
            obj.maps_ = [ReliabilityMap.from_dict(m) for m in d["maps"]]
        return obj

    def save(self, path: str | os.PathLike) -> Path:
        """Write the maps as JSON (atomically)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExitReliabilityMaps:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no reliability-maps JSON at {path}")
        return cls.from_dict(json.loads(path.read_text()))


#: short alias
ExitMaps = ExitReliabilityMaps

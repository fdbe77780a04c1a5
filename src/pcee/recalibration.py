"""Online recalibration: refit a PCEE-type policy's reliability maps on recent labelled traffic.

A reliability map is fit on validation data; when traffic shifts, confidence stops meaning the
same accuracy and PCEE(δ) under-delivers (the control *shortfall* max(0, δ − accuracy) grows).
Given recent labelled rows (all exits' logits, labels), this module

1. splits them (seeded) into a *refit* part and a *held-out* part;
2. refits every exit's map on the old validation statistics **plus** the refit rows, each recent
   row weighted by ``w`` (the rule below), so recent data dominate where they exist and the old
   validation counts still fill the bins the recent rows do not reach;
3. evaluates PCEE at the served δ on the held-out rows with the old and the new maps and reports
   whether the shortfall improved (the gate); the old policy is never modified.

**Weight rule.** With ``N_val`` the total validation count in a map and ``N_refit`` the number of
refit rows, every recent row weighs ``w = max(1, ρ · N_val / N_refit)`` with
``ρ = recent_share / (1 − recent_share)`` (default ``recent_share = 0.8``, ρ = 4): in aggregate the
recent rows carry (at least) 80% of the mass of each map, whatever their number. Within a bin,
the refit accuracy is ``(n_b·acc_b + w·Σ c_i) / (n_b + w·m_b)`` — the old bin's evidence (count
``n_b``, accuracy ``acc_b``) plus the recent rows in that bin.

**Bin reliability under weights.** ``min_count`` must count *samples*, not weights (two recent
rows weighted 5 are not ten observations). The refit map keeps the old bin edges (a served map's
bins stay comparable across versions) and stores the effective number of observations per bin,
``n_b + m_b``, as its ``counts_``; a bin is trusted when that reaches ``min_count``, as in plain
PCEE. The weighted evidence (``n_b + w·m_b``) drives the accuracy estimate and, for PCEE-WS,
the kernel smoothing weights. A later recalibration then starts from effective counts again,
so weights never compound across versions.

The old validation statistics come from the fitted maps themselves (edges, accuracies, counts),
so no validation data need to travel with the served model. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pcee.calibration.reliability_map import ExitReliabilityMaps, ReliabilityMap, _smooth_isotonic
from pcee.calibration.scores import confidence
from pcee.policies.base import ExitPolicy

STATUSES = ("improved", "not_improved", "too_few_labels")


@dataclass(frozen=True)
class RecalibrationResult:
    """Outcome of :func:`recalibrate`. ``policy`` is the refit policy (None when nothing was refit)."""

    status: str
    reason: str
    delta: float
    n_labels: int
    n_refit: int = 0
    n_holdout: int = 0
    recent_weight: float = 0.0
    old_accuracy: float | None = None
    new_accuracy: float | None = None
    old_shortfall: float | None = None
    new_shortfall: float | None = None
    old_relative_cost: float | None = None
    new_relative_cost: float | None = None
    policy: ExitPolicy | None = field(default=None, repr=False, compare=False)

    @property
    def improved(self) -> bool:
        return self.status == "improved"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the policy object)."""
        return {k: v for k, v in self.__dict__.items() if k != "policy"}


def recent_weight(n_reference: float, n_recent: int, recent_share: float = 0.8) -> float:
    """Weight of one recent row: ``max(1, ρ · n_reference / n_recent)``, ρ = share / (1 − share)."""
    if not 0.0 < recent_share < 1.0:
        raise ValueError(f"recent_share must be in (0, 1), got {recent_share}")
    if n_recent <= 0:
        raise ValueError("n_recent must be positive")
    rho = recent_share / (1.0 - recent_share)
    return float(max(1.0, rho * float(n_reference) / float(n_recent)))


def control_at_delta(
    policy: ExitPolicy, logits: np.ndarray, labels: np.ndarray, delta: float, flops: np.ndarray | None = None
) -> tuple[float, float, float | None]:
    """Achieved accuracy, shortfall max(0, δ − accuracy) and relative cost of ``policy`` on rows."""
    exits = policy.decide(logits)
    preds = logits[np.arange(len(exits)), exits].argmax(axis=-1)
    accuracy = float((preds == labels).mean())
    rel_cost = None
    if flops is not None:
        flops = np.asarray(flops, dtype=np.float64)
        rel_cost = float(flops[exits].mean() / flops[-1])
    return accuracy, max(0.0, float(delta) - accuracy), rel_cost



def _served_delta(policy: ExitPolicy) -> float:
    params = policy.get_params()
    if "delta" not in params:
        raise ValueError(f"policy {policy.name!r} has no delta parameter; recalibration needs a PCEE-type policy")
    return float(params["delta"])


def policy_maps(policy: ExitPolicy) -> ExitReliabilityMaps:
    """The fitted per-exit reliability maps of a PCEE-type policy."""
    maps = getattr(policy, "maps_", None)
    if not isinstance(maps, ExitReliabilityMaps) or not hasattr(maps, "maps_"):
        raise ValueError(
            f"policy {getattr(policy, 'name', type(policy).__name__)!r} has no fitted reliability maps; "
            "recalibration works on fitted PCEE-type policies (pcee, pcee-ws, risk-controlled)"
        )
    return maps


def refit_map(old: ReliabilityMap, scores: np.ndarray, correct: np.ndarray, weight: float) -> ReliabilityMap:
    """A new map on the old map's edges: old bin evidence plus recent rows weighted ``weight``."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    correct = np.asarray(correct, dtype=np.float64)
    n_old = np.asarray(old.counts_, dtype=np.float64)
    acc_old = np.asarray(old.raw_acc_, dtype=np.float64)
    nb = len(n_old)
    idx = old.bin_index(scores)
    m = np.bincount(idx, minlength=nb).astype(np.float64)  # recent rows per bin
    hits = np.bincount(idx, weights=correct, minlength=nb)
    weighted = n_old + weight * m
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = np.where(weighted > 0, (n_old * acc_old + weight * hits) / np.where(weighted > 0, weighted, 1.0), 0.0)
    effective = n_old + m
    new = ReliabilityMap(**old.get_params())
    new.edges_ = np.asarray(old.edges_, dtype=np.float64).copy()
    new.raw_acc_ = raw
    new.counts_ = effective
    if new.smoothing == "kernel":
        new.acc_ = _smooth_isotonic(new.centres_, raw, weighted, float(new.bandwidth))
    else:
        new.acc_ = np.where((effective >= new.min_count) & (effective > 0), raw, 0.0)
    return new


def refit_policy(policy: ExitPolicy, logits: np.ndarray, labels: np.ndarray, weight: float) -> ExitPolicy:
    """A copy of ``policy`` whose maps are refit with recent rows (logits (N, L, K), labels (N,))."""
    old_maps = policy_maps(policy)
    scores = confidence(logits, old_maps.score)  # (N, L)
    correct = logits.argmax(axis=-1) == labels[:, None]  # (N, L)
    new_maps = ExitReliabilityMaps(**old_maps.get_params())
    new_maps.maps_ = [
        refit_map(old_maps.maps_[level], scores[:, level], correct[:, level], weight) for level in range(len(old_maps.maps_))
    ]
    new_policy = type(policy).from_dict(policy.to_dict())  # an independent copy: the served policy stays as it is
    new_policy.maps_ = new_maps
    return new_policy


def recalibrate(
    policy: ExitPolicy,
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    flops: np.ndarray | None = None,
    delta: float | None = None,
    recent_share: float = 0.8,
    holdout_fraction: float = 0.3,
    min_labels: int = 100,
    min_improvement: float = 0.0,
    seed: int = 0,
) -> RecalibrationResult:
    """Refit ``policy``'s maps on recent labelled rows and gate on a held-out part of them.

    Parameters
    ----------
    policy : fitted PCEE-type policy (has ``maps_`` and ``delta``); never modified.
    logits : (N, L, K) all exits' logits of the recent labelled rows; ``labels`` (N,).
    flops : (L,) cumulative cost, only to report relative cost.
    delta : the served δ (default: the policy's own).
    recent_share : aggregate share of the recent rows in each map (weight rule in the module doc).
    holdout_fraction : share of the rows kept out of the refit, for the gate.
    min_labels : fewer labelled rows → ``status="too_few_labels"``, nothing refit.
    min_improvement : the new shortfall must be below the old one by more than this (points/100).
    seed : the refit/held-out split.

    Returns
    -------
    RecalibrationResult, ``status`` one of ``STATUSES``; ``policy`` holds the refit policy when
    the maps were refit (also when the gate says "not_improved", for inspection).
    """
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 3:
        raise ValueError(f"logits must be (N, L, K), got shape {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be ({logits.shape[0]},), got shape {labels.shape}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    maps = policy_maps(policy)
    if logits.shape[1] != len(maps.maps_):
        raise ValueError(f"logits have {logits.shape[1]} exits but the policy's maps cover {len(maps.maps_)}")
    delta = _served_delta(policy) if delta is None else float(delta)
    n = int(labels.shape[0])
    if n < max(int(min_labels), 2):
        return RecalibrationResult(
            status="too_few_labels",
            reason=f"{n} labelled rows, need at least {min_labels}: maps unchanged",
            delta=delta,
            n_labels=n,
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_hold = min(max(1, int(round(holdout_fraction * n))), n - 1)
    hold, refit = order[:n_hold], order[n_hold:]
    n_reference = float(np.asarray(maps.maps_[0].counts_).sum())
    weight = recent_weight(n_reference, len(refit), recent_share)
    new_policy = refit_policy(policy, logits[refit], labels[refit], weight)
    old_acc, old_short, old_cost = control_at_delta(policy, logits[hold], labels[hold], delta, flops)
    new_acc, new_short, new_cost = control_at_delta(new_policy, logits[hold], labels[hold], delta, flops)
    improved = new_short < old_short - float(min_improvement)
    reason = (
        f"held-out shortfall at delta={delta:.3f}: {old_short:.4f} (old maps) -> {new_short:.4f} (refit maps)"
        + ("" if improved else "; not an improvement: maps unchanged")
    )
    return RecalibrationResult(
        status="improved" if improved else "not_improved",
        reason=reason,
        delta=delta,
        n_labels=n,
        n_refit=int(len(refit)),
        n_holdout=int(n_hold),
        recent_weight=weight,
        old_accuracy=old_acc,
        new_accuracy=new_acc,
        old_shortfall=old_short,
        new_shortfall=new_short,
        old_relative_cost=old_cost,
        new_relative_cost=new_cost,
        policy=new_policy,
    )

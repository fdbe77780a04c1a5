"""Metrics of early-exit models and policies (docs/architecture.md).

- accuracy, mean and relative FLOPs of a set of exit decisions;
- control shortfall max(0, δ - accuracy): mean and max over achievable δ (δ <= final-exit accuracy);
- per-exit expected calibration error (equal-width bins, bin of s = min(floor(s B), B-1));
- per-exit failure-prediction AUROC (the score ranking correct above wrong answers);
- AURC, the area under the risk-coverage curve;
- the area gap between a policy's accuracy-cost curve and the oracle's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pcee.calibration.scores import confidence

if TYPE_CHECKING:  # pragma: no cover
    from pcee.sweep import SweepResult


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the labels."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.size == 0:
        raise ValueError(
            f"predictions and labels must be non-empty and of equal shape, got {predictions.shape} and {labels.shape}"
        )
    return float((predictions == labels).mean())


def mean_flops(exits: np.ndarray, flops: np.ndarray) -> float:
    """Mean cumulative FLOPs F_exit of samples answered at ``exits`` (0-based)."""
    return float(np.asarray(flops, dtype=np.float64)[np.asarray(exits, dtype=np.int64)].mean())


def shortfall_summary(result: SweepResult, min_delta: float | None = None) -> dict[str, Any]:
    """Mean and max control shortfall over achievable δ (δ <= the final exit's accuracy).

    ``min_delta`` restricts to δ >= min_delta as well (e.g. the issue's "δ >= 0.8"). Returns
    ``{"mean", "max", "n"}``; NaN statistics when no δ qualifies or the policy has no δ.
    """
    mask = result.achievable.copy()
    if min_delta is not None:
        mask &= result.delta >= float(min_delta) - 1e-12
    s = result.shortfall[mask]
    if s.size == 0 or np.all(np.isnan(s)):
        return {"mean": float("nan"), "max": float("nan"), "n": int(s.size)}
    return {"mean": float(np.mean(s)), "max": float(np.max(s)), "n": int(s.size)}


def _scores_correct(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    c = np.asarray(correct).astype(bool).ravel()
    if s.shape != c.shape or s.size == 0:
        raise ValueError(f"scores and correct must be non-empty and of equal length, got {s.size} and {c.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain non-finite values")
    return s, c


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over equal-width bins of [0, 1].

    acc_b and conf_b are the mean correctness and mean confidence of the n_b samples in bin b;
    the bin of s is min(floor(s B), B-1) (scores clipped to [0, 1]); empty bins add nothing.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    s, c = _scores_correct(confidences, correct)
    s = np.clip(s, 0.0, 1.0)
    b = np.minimum(np.floor(s * n_bins).astype(np.int64), n_bins - 1)
    sum_conf = np.bincount(b, weights=s, minlength=n_bins)
    sum_acc = np.bincount(b, weights=c.astype(np.float64), minlength=n_bins)
    # sum_b (n_b/N) |acc_b - conf_b| = sum_b |sum_acc_b - sum_conf_b| / N
    return float(np.abs(sum_acc - sum_conf).sum() / s.size)


def failure_auroc(scores: np.ndarray, correct: np.ndarray) -> float:
    """AUROC of the score as a predictor of correctness (ties count 1/2): P(s_correct > s_wrong).

    Equals ``sklearn.metrics.roc_auc_score(correct, scores)``; NaN when all answers are right or
    all wrong (undefined).
    """
    from sklearn.metrics import roc_auc_score

    s, c = _scores_correct(scores, correct)
    if c.all() or not c.any():
        return float("nan")
    return float(roc_auc_score(c, s))


def risk_coverage_curve(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage (n,), risk (n,)): answering the k most confident samples, k = 1..n.

    Tied scores cannot be split by a threshold, so every k inside a group of ties gets the risk
    of the whole group's end (order-independent).
    """
    s, c = _scores_correct(scores, correct)
    order = np.argsort(-s, kind="stable")
    s_sorted, wrong = s[order], (~c[order]).astype(np.float64)
    n = s.size
    cum_wrong = np.cumsum(wrong)
    # index of the last member of each sample's tie group
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), n - 1]
    group_end = last[np.searchsorted(last, np.arange(n))]
    k = np.arange(1, n + 1)
    return k / n, cum_wrong[group_end] / (group_end + 1)


def aurc(scores: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean over k = 1..n of the error rate among the
    k most confident answers (ties: see :func:`risk_coverage_curve`). Lower is better."""
    _, risk = risk_coverage_curve(scores, correct)
    return float(risk.mean())


def _envelope(relative_cost: np.ndarray, acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best accuracy reachable at cost <= c: points sorted by cost, accuracy a running maximum."""
    c, a = np.asarray(relative_cost, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    keep = np.isfinite(c) & np.isfinite(a)
    c, a = c[keep], a[keep]
    if c.size == 0:
        raise ValueError("a curve needs at least one finite (cost, accuracy) point")
    order = np.lexsort((a, c))
    return c[order], np.maximum.accumulate(a[order])


def oracle_area_gap(
    policy_cost: np.ndarray, policy_acc: np.ndarray, oracle_cost: np.ndarray, oracle_acc: np.ndarray
) -> float:
    """Mean accuracy gap between the oracle's and a policy's accuracy-vs-relative-cost curves.

    Each curve becomes its upper envelope (the best accuracy at relative cost <= c), linearly
    interpolated between its points and held constant past its ends. The gap is
    (1 / (c_hi - c_lo)) ∫ (A_oracle(c) - A_policy(c)) dc over c_lo = the larger of the two
    cheapest costs, c_hi = the larger of the two highest costs: the area between the curves
    divided by the cost range, i.e. the accuracy (as a fraction) lost on average over that range.
    0 means the policy is as good as the oracle; it can be negative only by interpolation.
    """
    pc, pa = _envelope(policy_cost, policy_acc)
    oc, oa = _envelope(oracle_cost, oracle_acc)
    lo, hi = max(pc[0], oc[0]), max(pc[-1], oc[-1])
    if hi <= lo:
        return float(np.interp(lo, oc, oa) - np.interp(lo, pc, pa))
    grid = np.unique(np.clip(np.concatenate([pc, oc, [lo, hi]]), lo, hi))
    gap = np.interp(grid, oc, oa) - np.interp(grid, pc, pa)
    # both curves are piecewise linear between the union of breakpoints: the trapezoid rule is exact
    area = float(np.sum(0.5 * (gap[1:] + gap[:-1]) * np.diff(grid)))
    return area / (hi - lo)


def per_exit_metrics(
    logits: np.ndarray, labels: np.ndarray, score: str = "max_prob", n_bins: int = 15
) -> list[dict[str, float]]:
    """Accuracy, ECE, failure AUROC and AURC of every exit: one dict per exit."""

    logits = np.asarray(logits)
    labels = np.asarray(labels)
    conf = confidence(logits, score)  # (N, L)
    correct = logits.argmax(axis=-1) == labels[:, None]  # (N, L)
    return [
        {
            "exit": level + 1,
            "accuracy": float(correct[:, level].mean()),
            "ece": expected_calibration_error(conf[:, level], correct[:, level], n_bins),
            "auroc": failure_auroc(conf[:, level], correct[:, level]),
            "aurc": aurc(conf[:, level], correct[:, level]),
        }
        for level in range(logits.shape[1])
    ]


def per_exit_metrics_flat(
    logits: np.ndarray,
    labels: np.ndarray,
    flops: np.ndarray | None = None,
    keys: tuple[str, ...] | None = None,
    score: str = "max_prob",
    n_bins: int = 15,
) -> dict[str, float]:
    """:func:`per_exit_metrics` as one flat dict, the form MLflow and DVC log: ``exit{l}_{key}`` for
    each exit l = 1..L and each key (``keys``, default all of accuracy, ece, auroc, aurc), then
    ``exit{l}_flops`` when the cumulative ``flops`` (L,) are given."""
    out: dict[str, float] = {}
    for level, m in enumerate(per_exit_metrics(logits, labels, score=score, n_bins=n_bins)):
        for key in (k for k in m if k != "exit") if keys is None else keys:
            out[f"exit{level + 1}_{key}"] = float(m[key])
        if flops is not None:
            out[f"exit{level + 1}_flops"] = float(flops[level])
    return out

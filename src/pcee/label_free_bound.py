"""No silent break: a label-free *lower* bound on the accuracy of answered requests under shift.

After a drift alarm and before labels arrive, nothing here is certified; what pcee can do is refuse to
call an answer "answered" unless the label-free evidence supports α (docs/architecture.md, "No silent
break"). On shadow rows (requests also run to the final exit, no labels) three estimators of each row's
correctness at the exit that answers it are computed (:class:`ShiftEstimators`):

- ``map``: the served reliability map's value (what the map, fitted on labelled validation rows,
  expects; it falls where confidences fall, e.g. under low contrast);
- ``agree_atc``: "agrees with the final exit" times the final map's value moved by one logit shift to
  ATC's estimate of the final exit's accuracy (Garg et al., ICLR 2022; :mod:`pcee.label_free`);
- ``agree_doc``: the same with the difference-of-confidences estimate of the final exit's accuracy
  (Guillory et al., ICCV 2021: validation accuracy minus the drop in mean max-prob).

On a set of answered rows the estimate is the *smallest* of the three means, and the lower bound is
that minus a **margin**: the estimator's worst over-estimate measured on validation-time synthetic
shifts (:func:`synthetic_shifts`: CIFAR-10-C style corruptions at severities 1-5, JPEG at qualities
40-5, label-prior shifts) of the *calibrate* rows of the validation split, worst over every answered set
of at least ``min_answered`` rows (:class:`MarginCalibration`). The answer rule
(:func:`lower_bound_rule`) serves the lowest ρ whose lower bound is >= α (kind ``lower_bound``; the
margin is the worst error over every answered set, so no set needs a test of its own); when none does,
the rule is ``unverified``: every request is declined (the best guess still returned, flagged), and the
response, ``/health`` and ``/metrics`` say "unverified under drift" until labels certify
(:mod:`pcee.few_labels`).

Reported leave-one-family-out (``benchmarks/shift_control.py``): the margin a condition is judged with
never saw its corruption family. A shift outside every family seen can still break the bound; the
estimate is labelled as one everywhere. numpy only (the synthetic shifts use :mod:`pcee.data.corruptions`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pcee.calibration.ltt import check_target
from pcee.calibration.scores import confidence
from pcee.data.corruptions import CORRUPTIONS, JPEG_QUALITIES, corrupt, jpeg_compress
from pcee.label_free import DEFAULT_ATC_SCORE, ATCEstimator, calibrate_level, label_free_refit
from pcee.selective import DEFAULT_GRID, AnswerRule, expected_at_exit
from pcee.verification import LOWER_BOUND, UNVERIFIED

ESTIMATORS = ("map", "agree_atc", "agree_doc")
#: answered sets smaller than this are neither judged nor measured (their accuracy is mostly noise)
MIN_ANSWERED = 30
#: the synthetic families; a corruption family holds every severity of its corruption
FAMILIES = ("gaussian_noise", "gaussian_blur", "contrast", "brightness", "pixelate", "jpeg", "label_prior")
SYNTHETIC_SEVERITIES = (1, 2, 3, 4, 5)
PRIOR_DRAWS = 3
PRIOR_CLASSES = 3
PRIOR_SHARE = 0.7


@dataclass
class ShiftEstimators:
    """The label-free estimators, fitted on labelled validation rows (the rows the maps were fitted on)."""

    atc: ATCEstimator
    source_accuracy: np.ndarray  # (L,) per exit, on the fitted rows
    source_confidence: np.ndarray  # (L,) mean max-prob per exit, on the fitted rows

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray, score: str = DEFAULT_ATC_SCORE) -> ShiftEstimators:
        logits, labels = np.asarray(logits), np.asarray(labels)
        atc = ATCEstimator(score=score).fit(logits, labels)
        return cls(
            atc=atc,
            source_accuracy=(logits.argmax(-1) == labels[:, None]).mean(axis=0).astype(np.float64),
            source_confidence=confidence(logits, "max_prob").mean(axis=0).astype(np.float64),
        )

    def final_estimates(self, logits: np.ndarray) -> dict[str, float]:
        """ATC's and DoC's estimates of the final exit's accuracy on unlabelled logits (N, L, K)."""
        atc = float(self.atc.estimate(logits)[-1])
        drop = float(self.source_confidence[-1] - confidence(logits[:, -1:, :], "max_prob").mean())
        return {"atc": atc, "doc": float(np.clip(self.source_accuracy[-1] - drop, 1e-3, 1.0 - 1e-3))}

    def row_estimates(
        self, reference: Any, logits: np.ndarray, served: Any | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(exits (N,), served map values (N,), {estimator: estimated correctness (N,)}) on unlabelled rows.

        ``reference`` is the policy whose maps were fitted on labelled validation rows (the champion);
        ``served`` the policy that decides exits and orders requests (default: the reference)."""
        logits = np.asarray(logits)
        served = reference if served is None else served
        exits, scores = expected_at_exit(served, logits)
        n, last = logits.shape[0], logits.shape[1] - 1
        rows = np.arange(n)
        ref_map = np.empty(n, dtype=np.float64)
        for level in np.unique(exits):
            at = exits == level
            ref_map[at] = reference.expected_accuracy(int(level), logits[at, int(level), :])
        final_map = np.asarray(reference.expected_accuracy(last, logits[:, last, :]), dtype=np.float64)
        agree = logits[rows, exits].argmax(-1) == logits[:, last].argmax(-1)
        levels = self.final_estimates(logits)
        est = {"map": np.nan_to_num(ref_map, nan=0.0)}
        for name in ("atc", "doc"):
            est[f"agree_{name}"] = agree * calibrate_level(np.nan_to_num(final_map, nan=0.0), levels[name])
        return exits, scores, est

    def to_dict(self) -> dict[str, Any]:
        return {
            "atc": self.atc.to_dict(),
            "source_accuracy": self.source_accuracy.tolist(),
            "source_confidence": self.source_confidence.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShiftEstimators:
        return cls(
            atc=ATCEstimator.from_dict(d["atc"]),
            source_accuracy=np.asarray(d["source_accuracy"], dtype=np.float64),
            source_confidence=np.asarray(d["source_confidence"], dtype=np.float64),
        )


def smallest_estimate(est: dict[str, np.ndarray], rows: np.ndarray, names: tuple[str, ...] = ESTIMATORS) -> float:
    """The smallest estimator's mean estimated correctness over ``rows`` (bool mask)."""
    return float(min(est[k][rows].mean() for k in names))


def answered_sets(
    scores: np.ndarray, min_answered: int, grid: np.ndarray | None = None
) -> Iterator[tuple[float, np.ndarray]]:
    """(ρ, answered mask) from ρ = 1 down, skipping sets of fewer than ``min_answered`` rows."""
    values = np.sort(np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64))[::-1]
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    for rho in values:
        rows = s >= rho - 1e-12
        if int(rows.sum()) >= int(min_answered):
            yield float(rho), rows


def worst_overestimate(
    estimators: ShiftEstimators,
    reference: Any,
    logits: np.ndarray,
    labels: np.ndarray,
    min_answered: int = MIN_ANSWERED,
    served: Any | None = None,
) -> float | None:
    """The worst (smallest estimate − measured accuracy) over the answered sets of labelled rows, in the
    order of ``served``'s maps (default the reference's); None when no set is large enough."""
    exits, scores, est = estimators.row_estimates(reference, logits, served)
    correct = np.asarray(logits)[np.arange(exits.size), exits].argmax(-1) == np.asarray(labels)
    errors = [
        smallest_estimate(est, rows) - float(correct[rows].mean()) for _, rows in answered_sets(scores, min_answered)
    ]
    return max(errors) if errors else None


@dataclass
class MarginCalibration:
    """Per synthetic shift, the estimator's worst over-estimate; the margin is the worst over families."""

    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # family -> {shift name: worst error}
    min_answered: int = MIN_ANSWERED

    def family_margin(self, family: str) -> float:
        return max(self.errors[family].values(), default=0.0)

    def margin(self, leave_out: str | None = None) -> float:
        """The largest worst error over the families (0 at least), ``leave_out`` excluded."""
        worst = [self.family_margin(f) for f in self.errors if f != leave_out]
        return float(max([0.0, *worst]))

    def to_dict(self) -> dict[str, Any]:
        return {"errors": self.errors, "min_answered": self.min_answered, "margin": self.margin()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MarginCalibration:
        return cls(errors={k: dict(v) for k, v in d["errors"].items()}, min_answered=int(d["min_answered"]))


def calibrate_margin(
    estimators: ShiftEstimators,
    reference: Any,
    shifts: Iterable[tuple[str, str, np.ndarray, np.ndarray]],
    target_accuracy: float | None = None,
    min_answered: int = MIN_ANSWERED,
) -> MarginCalibration:
    """The margin from labelled synthetic shifts ``(family, name, logits, labels)`` of calibrate rows.

    Each shift is measured in the order of the reference maps and, given α, also in the order of the
    label-free refit of those maps on the shift's own rows (:func:`pcee.label_free.label_free_refit`, no
    labels), as the label-free step will serve it; the worse of the two counts."""

    cal = MarginCalibration(min_answered=int(min_answered))
    for family, name, logits, labels in shifts:
        orders = [None]
        if target_accuracy is not None:
            refit = label_free_refit(reference, logits, estimators.atc, target_accuracy=target_accuracy)
            orders += [refit.policy] if refit.accepted else []
        worst = [worst_overestimate(estimators, reference, logits, labels, min_answered, served) for served in orders]
        found = [w for w in worst if w is not None]
        if found:
            cal.errors.setdefault(family, {})[name] = float(max(found))
    if not cal.errors:
        raise ValueError(f"no synthetic shift had {min_answered} answered rows to measure the estimators on")
    return cal


def synthetic_shifts(
    x: np.ndarray, labels: np.ndarray, predict: Callable[[np.ndarray], np.ndarray], seed: int = 0
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """``(family, name, logits, labels)`` of the validation-time synthetic shifts of images ``x`` (N, C, H, W)
    in [0, 1]; ``predict`` maps images to all exits' logits (N, L, K)."""

    labels = np.asarray(labels)
    for name in CORRUPTIONS:
        for severity in SYNTHETIC_SEVERITIES:
            xs = np.asarray(corrupt(x, name, severity, seed=seed), dtype=np.float32)
            yield name, f"{name}/{severity}", predict(xs), labels
    for quality in JPEG_QUALITIES:
        yield "jpeg", f"jpeg/{quality}", predict(np.asarray(jpeg_compress(x, quality), dtype=np.float32)), labels
    clean = predict(np.asarray(x, dtype=np.float32))
    rng = np.random.default_rng([int(seed), 7])
    num_classes = int(clean.shape[-1])
    for draw in range(PRIOR_DRAWS):
        rows = prior_resample(
            labels, np.arange(labels.size), rng.choice(num_classes, PRIOR_CLASSES, replace=False), rng
        )
        yield "label_prior", f"label_prior/{draw}", clean[rows], labels[rows]


def prior_resample(
    labels: np.ndarray, rows: np.ndarray, classes: np.ndarray, rng: np.random.Generator, share: float = PRIOR_SHARE
) -> np.ndarray:
    """``len(rows)`` rows drawn with replacement from ``rows`` so that ``classes`` make ``share`` of them."""
    inside = np.isin(np.asarray(labels)[rows], classes)
    w = np.where(inside, share / max(int(inside.sum()), 1), (1.0 - share) / max(int((~inside).sum()), 1))
    return rng.choice(rows, size=rows.size, replace=True, p=w / w.sum())


def lower_bound_rule(
    estimators: ShiftEstimators,
    reference: Any,
    logits: np.ndarray,
    target_accuracy: float,
    margin: float,
    min_answered: int = MIN_ANSWERED,
    served: Any | None = None,
) -> AnswerRule:
    """The label-free answer rule on unlabelled shadow rows (N, L, K): kind ``lower_bound`` (the lowest ρ
    whose smallest estimate minus ``margin`` is >= α) or ``unverified`` (none: every request declined)."""

    check_target(target_accuracy, 0.1)
    _, scores, est = estimators.row_estimates(reference, logits, served)
    chosen = None
    for rho, rows in answered_sets(scores, min_answered):  # the margin covers every set: keep the largest that passes
        lower = smallest_estimate(est, rows) - float(margin)
        if lower >= float(target_accuracy) - 1e-12:
            chosen = (rho, rows, lower)
    alpha, n = float(target_accuracy), int(scores.size)
    if chosen is None:
        return AnswerRule(threshold=1.0, kind="unverified", target_accuracy=alpha, n=n, coverage=0.0)
    rho, rows, lower = chosen
    return AnswerRule(
        threshold=rho,
        kind="lower_bound",
        target_accuracy=alpha,
        n=n,
        coverage=float(rows.mean()),
        answered_accuracy=smallest_estimate(est, rows),
        accuracy_lower_bound=lower,
    )


@dataclass(frozen=True)
class LabelFreeVersion:
    """What the label-free step serves after a drift alarm (:func:`label_free_version`)."""

    refit: Any  # pcee.label_free.LabelFreeResult (the refit maps and their agreement gate); None: too few rows
    policy: Any  # the refit policy when its gate accepted it, else the champion's
    rule: AnswerRule  # kind lower_bound or unverified
    margin: float
    n_shadow: int

    @property
    def status(self) -> str:

        return LOWER_BOUND if self.rule.kind == "lower_bound" else UNVERIFIED

    @property
    def refit_status(self) -> str:
        return "too_few_rows" if self.refit is None else str(self.refit.status)

    @property
    def reason(self) -> str:
        accepted = self.refit is not None and self.refit.accepted
        maps = "the label-free refit maps" if accepted else f"the champion's maps (refit {self.refit_status})"
        return (
            f"{self.status}: {self.n_shadow} shadow rows, no labels; serving {maps}; margin {self.margin:.3f} (worst "
            f"over-estimate on validation-time synthetic shifts); {self.rule.guarantee}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "margin": self.margin,
            "n_shadow": self.n_shadow,
            "refit_status": self.refit_status,
            "answer_rule": self.rule.to_dict(),
        }


def label_free_version(
    policy: Any,
    logits: np.ndarray | None,
    estimators: ShiftEstimators,
    calibration: MarginCalibration,
    target_accuracy: float,
    *,
    leave_out: str | None = None,
    flops: np.ndarray | None = None,
    min_rows: int = 50,
    seed: int = 0,
) -> LabelFreeVersion:
    """The label-free version on unlabelled shadow rows (N, L, K): the label-free refit of ``policy``'s
    maps (served when its agreement gate accepts it: the order labels will later certify), with the
    lower-bound answer rule at the calibration's margin (``leave_out``: a family the margin must not have
    seen, for the benchmark's leave-one-family-out report). Fewer than ``min_rows`` rows (or none):
    the champion's maps, every request declined until labels certify."""

    margin = calibration.margin(leave_out)
    n = 0 if logits is None else int(np.asarray(logits).shape[0])
    if logits is None or n < max(int(min_rows), 1):
        rule = AnswerRule(threshold=1.0, kind="unverified", target_accuracy=float(target_accuracy), n=n)
        return LabelFreeVersion(refit=None, policy=policy, rule=rule, margin=margin, n_shadow=n)
    logits = np.asarray(logits, dtype=np.float32)
    refit = label_free_refit(
        policy, logits, estimators.atc, target_accuracy=target_accuracy, flops=flops, min_rows=min_rows, seed=seed
    )
    served = refit.policy if refit.accepted else policy
    rule = lower_bound_rule(estimators, policy, logits, target_accuracy, margin, calibration.min_answered, served)
    return LabelFreeVersion(refit=refit, policy=served, rule=rule, margin=margin, n_shadow=n)


__all__ = [
    "LabelFreeVersion",
    "label_free_version",
    "ESTIMATORS",
    "FAMILIES",
    "MIN_ANSWERED",
    "MarginCalibration",
    "ShiftEstimators",
    "answered_sets",
    "calibrate_margin",
    "lower_bound_rule",
    "prior_resample",
    "smallest_estimate",
    "synthetic_shifts",
    "worst_overestimate",
]

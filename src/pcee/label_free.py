"""Label-free recalibration: refit the maps and choose ρ on shifted traffic before any label arrives.

Labels come late or never in production, so on a drift alarm pcee first refits from what the traffic
itself says (docs/architecture.md, "Recalibration without labels"):

1. **Estimated accuracy without labels (ATC).** Average Thresholded Confidence (Garg et al., ICLR
   2022): on the validation outputs, per exit, learn the confidence threshold t_l such that the share
   of samples above it equals the exit's accuracy; on new traffic the share above t_l estimates the
   exit's accuracy. :class:`ATCEstimator` does this per exit on any score of
   :mod:`pcee.calibration.scores` (default ``entropy``: ATC's negative-entropy variant, the better
   one in the paper).
2. **Shadow rows.** A small fraction of requests also runs to the final exit (the service's
   ``shadow_fraction``); where an early exit agrees with the final exit is a free label for
   *agreement* (Apparate's feedback idea). The other requests keep their early-exit savings.
3. **The refit.** On the shadow rows (all exits' logits, no labels):

   - the final exit's map is recalibrated to the ATC estimate: its values m_i on the recent rows
     are moved by one shift b in logit space, ``c_i = sigmoid(logit(m_i) + b)``, with b chosen so
     that ``mean(c_i)`` equals the ATC estimate of the final exit's accuracy (a monotone change:
     the ranking of the map is kept, its level follows the shift);
   - an early exit's estimated correctness on a row is ``agree_l,i · c_i``: it can only be right
     (in this estimate) where it agrees with the final exit, and then as often as the final exit is.
     This ignores rows where the early exit is right and the final exit wrong, so it errs low
     (conservative: more compute, more declined);
   - the maps are refit with these soft labels by the same weighted rule as the labelled refit
     (:func:`pcee.recalibration.refit_policy_soft`), the served δ becomes the target α (PCEE's
     premise: the maps now estimate accuracy), and ρ is the label-free point estimate
     (:func:`pcee.selective.estimate_answer_threshold`) on held-out shadow rows: 0 where their
     estimated accuracy as a whole (each row's estimated correctness at its exit) meets α.

**Gate.** On held-out shadow rows, the share of *answered* rows whose answer equals the final exit's
(agreement) must not fall: a refit that would lower it is refused (``status="refused"``). Nothing
here is certified: every report says "estimated, no labels".

**What is served after a drift alarm** (:func:`pcee.label_free_bound.label_free_version`): these maps
(when the gate accepts them) give the *order* of requests, but not the answer rule: the point estimate
ρ above answered below α under most shifts of ``benchmarks/shift_control.py`` (ATC over-estimates
where the network stays confident), so the served ρ is the label-free *lower bound* rule, which
declines ("unverified under drift") what it cannot support, and labels then certify ρ on that order
(:mod:`pcee.few_labels`). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import expit, logit

from pcee.calibration.ltt import check_target
from pcee.calibration.scores import check_score, confidence
from pcee.policies.base import ExitPolicy
from pcee.recalibration import policy_maps, recent_weight, refit_policy_soft, split_recent
from pcee.selective import NO_RULE, AnswerRule, answered_mask, estimate_answer_threshold, expected_at_exit

LABEL_FREE_STATUSES = ("label_free", "refused", "too_few_rows")
#: default score of the ATC estimator (ATC-NE in Garg et al.)
DEFAULT_ATC_SCORE = "entropy"


class ATCEstimator:
    """Average Thresholded Confidence, one threshold per exit.

    Parameters
    ----------
    score : confidence score (:data:`pcee.calibration.scores.SCORES`), default ``entropy``.

    Attributes (after ``fit``)
    --------------------------
    thresholds_ : (L,) t_l with mean(s_l > t_l) = accuracy_l on the fitted rows
    source_accuracy_ : (L,) accuracy of each exit on the fitted rows
    """

    def __init__(self, score: str = DEFAULT_ATC_SCORE) -> None:
        self.score = score

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> ATCEstimator:
        """Fit on labelled validation outputs: logits (N, L, K), labels (N,)."""
        check_score(self.score)
        logits, labels = np.asarray(logits), np.asarray(labels)
        if logits.ndim != 3 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
            raise ValueError(f"need logits (N, L, K) and labels (N,) with N > 0, got {logits.shape} and {labels.shape}")
        scores = confidence(logits, self.score)  # (N, L)
        accuracy = (logits.argmax(-1) == labels[:, None]).mean(axis=0)  # (L,)
        # the (1 - acc) quantile: the share of scores strictly above it is acc (up to ties)
        self.thresholds_ = np.array(
            [np.quantile(scores[:, l], 1.0 - accuracy[l], method="lower") for l in range(scores.shape[1])]
        )
        self.source_accuracy_ = accuracy.astype(np.float64)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "thresholds_"):
            raise ValueError(
                "this ATCEstimator is not fitted yet; call fit(logits, labels) on validation outputs first"
            )

    def estimate_from_scores(self, scores: np.ndarray) -> np.ndarray:
        """Estimated accuracy (L,) per exit from scores (N, L), NaN where an exit was not computed."""
        self._check_fitted()
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 2 or s.shape[1] != self.thresholds_.size:
            raise ValueError(f"scores must be (N, {self.thresholds_.size}), got shape {s.shape}")
        above = np.where(np.isnan(s), np.nan, (s > self.thresholds_[None, :]).astype(np.float64))
        with np.errstate(invalid="ignore"):
            return np.where(
                np.isnan(s).all(axis=0), np.nan, np.nanmean(np.where(np.isnan(above), np.nan, above), axis=0)
            )

    def estimate(self, logits: np.ndarray) -> np.ndarray:
        """Estimated accuracy (L,) per exit on unlabelled logits (N, L, K)."""
        return self.estimate_from_scores(confidence(np.asarray(logits), self.score))

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "score": self.score,
            "thresholds": self.thresholds_.tolist(),
            "source_accuracy": self.source_accuracy_.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ATCEstimator:
        obj = cls(score=str(d.get("score", DEFAULT_ATC_SCORE)))
        check_score(obj.score)
        obj.thresholds_ = np.asarray(d["thresholds"], dtype=np.float64)
        obj.source_accuracy_ = np.asarray(d["source_accuracy"], dtype=np.float64)
        return obj


def calibrate_level(values: np.ndarray, target_mean: float) -> np.ndarray:
    """Values in [0, 1] moved by one logit shift so that their mean is ``target_mean`` (bisection)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 1e-4, 1.0 - 1e-4)
    target = float(np.clip(target_mean, 1e-4, 1.0 - 1e-4))
    z = logit(v)
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if expit(z + mid).mean() < target:
            lo = mid
        else:
            hi = mid
    return expit(z + 0.5 * (lo + hi))


def estimated_correctness(policy: ExitPolicy, logits: np.ndarray, final_accuracy: float) -> np.ndarray:
    """Estimated probability (N, L) that each exit is right on unlabelled rows (module doc, step 3)."""
    logits = np.asarray(logits)
    final = logits.shape[1] - 1
    m = policy.expected_accuracy(final, logits[:, final, :])  # the final map's values
    c = calibrate_level(m, final_accuracy)  # (N,)
    agree = logits.argmax(-1) == logits[:, final, :].argmax(-1)[:, None]  # (N, L)
    out = agree * c[:, None]
    out[:, final] = c
    return out


def agreement_on_answered(
    policy: ExitPolicy, logits: np.ndarray, rule: AnswerRule
) -> tuple[float | None, float, float]:
    """(agreement with the final exit on answered rows, coverage, mean exit index) of a policy + ρ."""
    exits, expected = expected_at_exit(policy, logits)
    answered = rule.answered(expected)
    served = logits[np.arange(exits.size), exits].argmax(-1)
    final = logits[:, -1, :].argmax(-1)
    agreement = float((served == final)[answered].mean()) if answered.any() else None
    return agreement, float(answered.mean()), float(exits.mean())


@dataclass(frozen=True)
class LabelFreeResult:
    """Outcome of :func:`label_free_refit` (``policy`` and ``answer_rule`` to serve when accepted)."""

    status: str
    reason: str
    n_rows: int
    target_accuracy: float | None = None
    n_refit: int = 0
    n_holdout: int = 0
    recent_weight: float = 0.0
    estimated_accuracy: list[float] | None = None  # ATC, per exit, on the refit rows
    old_threshold: float | None = None
    new_threshold: float | None = None
    old_agreement: float | None = None
    new_agreement: float | None = None
    old_coverage: float | None = None
    new_coverage: float | None = None
    old_relative_cost: float | None = None
    new_relative_cost: float | None = None
    estimated_answered_accuracy: float | None = None
    seed: int = 0
    answer_rule: AnswerRule | None = field(default=None, compare=False)
    policy: ExitPolicy | None = field(default=None, repr=False, compare=False)

    @property
    def accepted(self) -> bool:
        return self.status == "label_free"

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("policy", "answer_rule")}
        d["answer_rule"] = None if self.answer_rule is None else self.answer_rule.to_dict()
        return d


def _relative_cost(policy: ExitPolicy, logits: np.ndarray, flops: np.ndarray | None) -> float | None:
    if flops is None:
        return None
    flops = np.asarray(flops, dtype=np.float64)
    return float((flops[policy.decide(logits)] / flops[-1]).mean())


def _checked(policy: ExitPolicy, logits: np.ndarray, target_accuracy: float):
    """(logits float32, the policy's maps), or a ValueError naming what cannot be refit without labels."""

    check_target(target_accuracy, 0.1)
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 3:
        raise ValueError(f"logits must be (N, L, K), got shape {logits.shape}")
    maps = policy_maps(policy)
    if logits.shape[1] != len(maps.maps_):
        raise ValueError(f"logits have {logits.shape[1]} exits but the policy's maps cover {len(maps.maps_)}")
    if policy.param_name != "delta" or not policy.sweeps_in_closed_form or policy.certifies_itself:
        raise ValueError(
            f"policy {policy.name!r}: the label-free refit serves PCEE(δ = α) on estimated maps; it works on "
            "pcee and pcee-ws (a risk-controlled policy chooses its threshold with labels)"
        )
    return logits, maps


def label_free_refit(
    policy: ExitPolicy,
    logits: np.ndarray,
    atc: ATCEstimator,
    *,
    target_accuracy: float,
    old_rule: AnswerRule | None = None,
    flops: np.ndarray | None = None,
    recent_share: float = 0.8,
    holdout_fraction: float = 0.3,
    min_rows: int = 50,
    seed: int = 0,
) -> LabelFreeResult:
    """Refit ``policy``'s maps on unlabelled recent rows (all exits' logits (N, L, K)); see the module doc.

    ``atc`` is fitted on the validation outputs the maps were fitted on (the bundle's reference);
    ``old_rule`` is the served answer rule (default: none). The old policy is never modified.
    """

    logits, maps = _checked(policy, logits, target_accuracy)
    old_rule = old_rule or NO_RULE
    n = int(logits.shape[0])
    base: dict[str, Any] = dict(
        n_rows=n, target_accuracy=float(target_accuracy), seed=int(seed), old_threshold=float(policy.served_threshold())
    )
    if n < max(int(min_rows), 2):
        return LabelFreeResult(
            status="too_few_rows", reason=f"{n} shadow rows, need at least {min_rows}: maps unchanged", **base
        )
    hold, refit = split_recent(n, holdout_fraction, seed)
    r_logits, h_logits = logits[refit], logits[hold]
    estimated = atc.estimate(r_logits)  # (L,)
    weight = recent_weight(float(np.asarray(maps.maps_[0].counts_).sum()), int(refit.size), recent_share)
    soft = estimated_correctness(policy, r_logits, float(estimated[-1]))
    new_policy = refit_policy_soft(policy, r_logits, soft, weight)
    new_policy.set_params(delta=float(target_accuracy))
    h_exits, h_expected = expected_at_exit(new_policy, h_logits)
    # the whole held-out traffic's estimated accuracy (each row's estimated correctness at its exit): where it
    # meets α nothing is declined, whatever single rows in sparse bins (map value 0) say
    h_soft = estimated_correctness(policy, h_logits, float(atc.estimate(h_logits)[-1]))
    overall = float(h_soft[np.arange(h_exits.size), h_exits].mean())
    rule = estimate_answer_threshold(h_expected, target_accuracy, overall=overall)

    old_agree, old_cov, _ = agreement_on_answered(policy, h_logits, old_rule)
    new_agree, new_cov, _ = agreement_on_answered(new_policy, h_logits, rule)
    refused = new_agree is None or (old_agree is not None and new_agree < old_agree - 1e-12)
    numbers = (
        f"held-out agreement with the final exit on answered rows {_p(old_agree)} (served maps, coverage {old_cov:.3f}) -> "
        f"{_p(new_agree)} (label-free maps, coverage {new_cov:.3f}); ATC estimate of the final exit's accuracy "
        f"{float(estimated[-1]):.4f} (validation {float(atc.source_accuracy_[-1]):.4f})"
    )
    reason = (
        f"refused: the label-free refit would lower agreement; {numbers}"
        if refused
        else f"label-free refit on {int(refit.size)} shadow rows (estimated, no labels, not certified): {numbers}"
    )
    return LabelFreeResult(
        status="refused" if refused else "label_free",
        reason=reason,
        n_refit=int(refit.size),
        n_holdout=int(hold.size),
        recent_weight=weight,
        estimated_accuracy=[float(v) for v in estimated],
        new_threshold=float(target_accuracy),
        old_agreement=old_agree,
        new_agreement=new_agree,
        old_coverage=old_cov,
        new_coverage=new_cov,
        old_relative_cost=_relative_cost(policy, h_logits, flops),
        new_relative_cost=_relative_cost(new_policy, h_logits, flops),
        estimated_answered_accuracy=rule.answered_accuracy,
        answer_rule=rule,
        policy=new_policy,
        **base,
    )


def _p(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


__all__ = [
    "ATCEstimator",
    "DEFAULT_ATC_SCORE",
    "LABEL_FREE_STATUSES",
    "LabelFreeResult",
    "agreement_on_answered",
    "answered_mask",
    "calibrate_level",
    "estimated_correctness",
    "label_free_refit",
]

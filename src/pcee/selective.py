"""Selective answering: an operating point is (exit rule, answer rule).

The exit rule (PCEE's δ) decides *where* a request is answered; the answer rule decides *whether*
the answer is given as a confident prediction. A request whose expected accuracy at the exit that
answers it (its reliability-map value, ``ExitResult.expected_accuracy``) is below ρ is declined:

- ``answer``: today's behaviour, every request answered (ρ is reported, not applied);
- ``abstain`` (the default): the response says ``"abstained": true`` and still carries the best
  guess and its expected accuracy, so a client that ignores the flag sees what it saw before, and a
  client that reads it is never handed a below-target answer as if it were confident. It needs no
  second service, so it is safe to switch on anywhere;
- ``defer``: the request is forwarded to a configured fallback service (e.g. a larger model) and its
  answer returned, marked ``deferred``.

ρ is chosen, not fixed (docs/architecture.md, "Selective answering"):

- :func:`choose_answer_threshold` (certified): Learn-then-Test fixed sequence on the calibrate rows
  over a fixed grid of ρ from 1 down to 0; the null "accuracy on answered rows < α" is rejected when
  the (1 − η) upper bound on the error among the answered calibrate rows is <= 1 − α. A grid value
  that answers fewer than ``min_answered`` rows is skipped, not tested: its count depends on the
  rows' map values only, never on their labels, so the skip keeps the test valid, and without it
  the sequence would stop at the top of the grid, where a handful of rows cannot certify anything. The lowest ρ before the first failure is served: the
  largest coverage whose answered accuracy is >= α with probability >= 1 − η. Where all traffic
  already meets α the sequence runs to ρ = 0 and nothing is declined.
- :func:`estimate_answer_threshold` (label-free): the lowest ρ whose *estimated* accuracy on answered
  rows (the mean of their expected accuracies) is >= α. A point estimate, labelled as one.

The threshold compares the map value at the answering exit, so a refit map (labelled or label-free,
:mod:`pcee.recalibration`, :mod:`pcee.label_free`) moves what is declined without touching ρ's meaning.
numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from pcee.calibration.bounds import check_bound, loss_upper_bound
from pcee.calibration.ltt import best_possible_accuracy, check_target

ANSWER_MODES = ("answer", "abstain", "defer")
#: the default answer mode of a deployment (module docstring: why)
DEFAULT_ANSWER_MODE = "abstain"
#: how a request ended: answered by this model, declined with the best guess, forwarded, forward failed
DECISIONS = ("answered", "abstained", "deferred", "deferral_failed")
#: where an answer rule came from (``lower_bound`` / ``unverified``: :mod:`pcee.label_free_bound`)
RULE_KINDS = ("certified", "not_certified", "point", "estimated", "lower_bound", "unverified", "none")
#: what the service compares expected accuracies with under an ``unverified`` rule: above every map
#: value, so every request is declined (the rule's own ``threshold`` stays in [0, 1] for display)
DECLINE_ALL = 2.0
#: ρ grid: 1 down to 0 in steps of 0.005 (fixed before any data is seen, as the fixed sequence needs)
DEFAULT_GRID = np.round(np.linspace(1.0, 0.0, 201), 6)
#: grid values answering fewer calibrate rows than this are skipped by the certified ρ sequence
MIN_ANSWERED = 50


def check_answer_mode(mode: str) -> str:
    if mode not in ANSWER_MODES:
        raise ValueError(f"unknown answer mode {mode!r}; valid: {', '.join(ANSWER_MODES)}")
    return mode


@dataclass(frozen=True)
class AnswerRule:
    """ρ with the evidence behind it (bundle meta ``answer_rule`` via :meth:`to_dict`).

    ``kind``: ``certified`` (fixed sequence passed down to ``threshold``), ``not_certified`` (not
    even the most selective grid value certifies: ``threshold`` is 1, nearly everything declined),
    ``point`` (measured on calibrate rows, no guarantee), ``estimated`` (label-free point estimate),
    ``lower_bound`` (label-free: the lowest ρ whose label-free lower bound on answered accuracy is >= α,
    :mod:`pcee.label_free_bound`), ``unverified`` (label-free evidence cannot support α on the current
    traffic: every request is declined, "unverified under drift"), ``none`` (no rule: ρ = 0).
    ``coverage`` / ``answered_accuracy`` are measured on the rows the rule was chosen on (estimated
    for ``estimated``); ``accuracy_lower_bound`` is 1 − the (1 − η) error bound on the answered rows.
    """

    threshold: float
    kind: str
    target_accuracy: float | None = None
    risk: float | None = None
    bound: str | None = None
    n: int = 0
    coverage: float | None = None
    answered_accuracy: float | None = None
    accuracy_lower_bound: float | None = None

    @property
    def certified(self) -> bool:
        return self.kind == "certified"

    @property
    def serving_threshold(self) -> float:
        """What expected accuracies are compared with when serving: ρ, or :data:`DECLINE_ALL` (unverified)."""
        return DECLINE_ALL if self.kind == "unverified" else float(self.threshold)

    def answered(self, expected_accuracy: np.ndarray) -> np.ndarray:
        """Bool (N,): which requests meet ρ (NaN expected accuracy never does; none under ``unverified``)."""
        return answered_mask(expected_accuracy, self.serving_threshold)

    @property
    def guarantee(self) -> str:
        """One line: what the rule promises, or that it is an estimate."""
        cov = "-" if self.coverage is None else f"{self.coverage:.3f}"
        if self.kind == "certified":
            if self.risk is None:
                raise ValueError("a certified answer rule needs its risk η")
            return (
                f"accuracy on answered requests >= {self.target_accuracy:g} with probability >= {1 - float(self.risk):.2f} "
                f"({self.bound} bound on {self.n} calibrate rows) at coverage {cov}, ρ = {self.threshold:.4g}"
            )
        if self.kind in ("point", "estimated"):
            what = (
                "(no guarantee): accuracy on answered calibrate rows"
                if self.kind == "point"
                else "(no guarantee, no labels): estimated accuracy on answered requests"
            )
            return f"point estimate {what} {_f(self.answered_accuracy)} at coverage {cov}, ρ = {self.threshold:.4g}"
        if self.kind == "lower_bound":
            return (
                f"label-free lower bound (no labels, not certified): estimated accuracy on answered requests >= "
                f"{_f(self.accuracy_lower_bound)} >= α = {self.target_accuracy:g} (the smallest estimator minus the margin "
                f"measured on synthetic shifts) at coverage {cov}, ρ = {self.threshold:.4g}"
            )
        if self.kind == "unverified":
            return (
                f"unverified under drift: the label-free evidence cannot support α = {self.target_accuracy:g} on the "
                "current traffic; every request is declined (best guess returned, flagged) until labels certify"
            )
        if self.kind == "not_certified":
            return (
                f"NOT certified: no ρ certifies accuracy >= {self.target_accuracy:g} on answered requests at risk "
                f"{self.risk:g}; ρ = {self.threshold:.4g}"
            )
        return "no answer rule: every request answered (ρ = 0)"

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "certified": self.certified}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AnswerRule:
        """From bundle meta (``answer_rule``); a missing rule answers everything."""
        if not d:
            return NO_RULE
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        rule = cls(**known)
        check_threshold(rule.threshold)
        return rule


def _f(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def check_threshold(rho: float) -> float:
    rho = float(rho)
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"answer threshold ρ must be in [0, 1], got {rho}")
    return rho


NO_RULE = AnswerRule(threshold=0.0, kind="none")


def answered_mask(expected_accuracy: np.ndarray, threshold: float) -> np.ndarray:
    """Bool (N,): expected accuracy >= ρ (ρ = 0 answers everything, NaN included)."""
    e = np.asarray(expected_accuracy, dtype=np.float64)
    if float(threshold) <= 0.0:
        return np.ones(e.shape, dtype=bool)
    return np.nan_to_num(e, nan=-np.inf) >= float(threshold) - 1e-12


def decisions(expected_accuracy: np.ndarray, threshold: float, mode: str) -> np.ndarray:
    """The decision per request before any forwarding: ``answered``, or ``abstained`` / ``deferred``
    (the service turns a failed forward into ``deferral_failed``). ``answer`` mode answers all."""
    check_answer_mode(mode)
    ok = (
        answered_mask(expected_accuracy, threshold)
        if mode != "answer"
        else np.ones(np.shape(expected_accuracy), dtype=bool)
    )
    declined = "abstained" if mode in ("abstain", "answer") else "deferred"
    return np.where(ok, "answered", declined).astype(object)


@overload
def _check_rows(expected_accuracy: np.ndarray, correct: None = None) -> tuple[np.ndarray, None]: ...


@overload
def _check_rows(expected_accuracy: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def _check_rows(
    expected_accuracy: np.ndarray, correct: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    e = np.asarray(expected_accuracy, dtype=np.float64).ravel()
    if correct is None:
        return e, None
    c = np.asarray(correct).ravel()
    if c.shape != e.shape:
        raise ValueError(f"correct must have one entry per row ({e.shape[0]}), got shape {c.shape}")
    return e, c.astype(bool)


def choose_answer_threshold(
    expected_accuracy: np.ndarray,
    correct: np.ndarray,
    target_accuracy: float,
    risk: float = 0.1,
    bound: str = "clopper-pearson",
    grid: np.ndarray | None = None,
    min_answered: int | None = None,
) -> AnswerRule:
    """Certified ρ on calibrate rows: expected accuracy (N,) at the answering exit, correct (N,) bool.

    Fixed sequence over ``grid`` (default :data:`DEFAULT_GRID`) from ρ = 1 down; see the module doc.
    ``min_answered`` (default: the larger of :data:`MIN_ANSWERED` and the fewest rows that could
    certify α with zero errors) skips grid values answering fewer rows.
    The rows must not have fitted the maps the expected accuracies come from.
    """

    check_target(target_accuracy, risk)
    check_bound(bound)
    e, c = _check_rows(expected_accuracy, correct)
    if e.size == 0:
        raise ValueError("no calibrate rows to choose the answer threshold on")
    values = np.sort(np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64).ravel())[::-1]
    if min_answered is None:
        lo, hi = 1, e.size + 1  # the fewest rows whose zero-error bound reaches α (monotone in n: bisection)
        while lo < hi:
            mid = (lo + hi) // 2
            if best_possible_accuracy(mid, risk, bound) >= target_accuracy:
                hi = mid
            else:
                lo = mid + 1
        zero_error = lo
        min_answered = max(MIN_ANSWERED, zero_error)
    chosen = None
    for rho in values:
        ans = answered_mask(e, rho)
        if int(ans.sum()) < int(min_answered) and rho > 0:
            continue  # too few answered rows to test: skipped (decided from map values, not labels)
        lower = float(1.0 - loss_upper_bound((~c[ans]).astype(np.float64), float(risk), bound)[0])
        if lower < float(target_accuracy) - 1e-12:
            break
        chosen = (float(rho), ans, lower)
    if chosen is None:
        return AnswerRule(
            threshold=float(values[0]),
            kind="not_certified",
            target_accuracy=float(target_accuracy),
            risk=float(risk),
            bound=bound,
            n=int(e.size),
            **_measured(e, c, float(values[0])),
        )
    rho, ans, lower = chosen
    return AnswerRule(
        threshold=rho,
        kind="certified",
        target_accuracy=float(target_accuracy),
        risk=float(risk),
        bound=bound,
        n=int(e.size),
        coverage=float(ans.mean()),
        answered_accuracy=float(c[ans].mean()),
        accuracy_lower_bound=lower,
    )


def _measured(e: np.ndarray, c: np.ndarray, rho: float) -> dict[str, Any]:
    ans = answered_mask(e, rho)
    return {"coverage": float(ans.mean()), "answered_accuracy": float(c[ans].mean()) if ans.any() else None}


def estimate_answer_threshold(
    expected_accuracy: np.ndarray, target_accuracy: float, grid: np.ndarray | None = None, overall: float | None = None
) -> AnswerRule:
    """Label-free ρ: the lowest grid value whose estimated accuracy on answered rows (the mean of their
    expected accuracies) is >= α. A point estimate (kind ``estimated``). ``overall``, an estimate of the
    accuracy of all rows, gives ρ = 0 when it meets α (nothing declined)."""

    check_target(target_accuracy, 0.1)
    e, _ = _check_rows(expected_accuracy)
    if e.size == 0:
        raise ValueError("no rows to estimate the answer threshold on")
    if overall is not None and float(overall) >= float(target_accuracy) - 1e-12:
        return AnswerRule(
            threshold=0.0,
            kind="estimated",
            target_accuracy=float(target_accuracy),
            n=int(e.size),
            coverage=1.0,
            answered_accuracy=float(overall),
        )
    values = np.sort(np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64).ravel())
    for rho in values:  # from 0 up: the first (largest coverage) that meets α
        ans = answered_mask(e, rho)
        if ans.any() and float(np.nanmean(e[ans])) >= float(target_accuracy) - 1e-12:
            return AnswerRule(
                threshold=float(rho),
                kind="estimated",
                target_accuracy=float(target_accuracy),
                n=int(e.size),
                coverage=float(ans.mean()),
                answered_accuracy=float(np.nanmean(e[ans])),
            )
    rho = float(values[-1])
    ans = answered_mask(e, rho)
    return AnswerRule(
        threshold=rho,
        kind="estimated",
        target_accuracy=float(target_accuracy),
        n=int(e.size),
        coverage=float(ans.mean()),
        answered_accuracy=float(np.nanmean(e[ans])) if ans.any() else None,
    )


@dataclass(frozen=True)
class SelectiveSummary:
    """Coverage and accuracy on answered requests of a window (JSON via ``__dict__``)."""

    n: int
    answered: int
    abstained: int
    deferred: int
    deferral_failed: int
    coverage: float | None
    answered_accuracy_estimated: float | None  # mean expected accuracy of the answered rows
    n_labelled_answered: int = 0
    answered_accuracy_measured: float | None = None  # on answered rows with a label
    n_impossible_labels: int = 0  # stored labels outside the answering model's classes, skipped

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(
    decision: np.ndarray, expected_accuracy: np.ndarray, correct: np.ndarray | None = None
) -> SelectiveSummary:
    """A window's summary from per-row decisions (:data:`DECISIONS`), expected accuracies and, where
    labels exist, ``correct`` (float with NaN for unlabelled rows, or bool for all rows)."""
    d = np.asarray(decision, dtype=object).ravel()
    unknown = sorted(set(d.tolist()) - set(DECISIONS))
    if unknown:
        raise ValueError(f"unknown decisions {unknown}; valid: {', '.join(DECISIONS)}")
    e = np.asarray(expected_accuracy, dtype=np.float64).ravel()
    ans = d == "answered"
    n = int(d.size)
    measured, n_lab = None, 0
    if correct is not None:
        c = np.asarray(correct, dtype=np.float64).ravel()
        lab = ans & ~np.isnan(c)
        n_lab = int(lab.sum())
        measured = float(c[lab].mean()) if n_lab else None
    return SelectiveSummary(
        n=n,
        answered=int(ans.sum()),
        abstained=int((d == "abstained").sum()),
        deferred=int((d == "deferred").sum()),
        deferral_failed=int((d == "deferral_failed").sum()),
        coverage=float(ans.mean()) if n else None,
        answered_accuracy_estimated=float(np.nanmean(e[ans])) if ans.any() and np.isfinite(e[ans]).any() else None,
        n_labelled_answered=n_lab,
        answered_accuracy_measured=measured,
    )


def expected_at_exit(policy: Any, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exits (N,), expected accuracy (N,) at the exit that answers) of a fitted policy on logits
    (N, L, K): what the early-exit runner reports per request, computed from all exits' logits."""
    logits = np.asarray(logits)
    exits = np.asarray(policy.decide(logits), dtype=np.int64)
    expected = np.empty(exits.shape[0], dtype=np.float64)
    for level in np.unique(exits):
        rows = exits == level
        expected[rows] = policy.expected_accuracy(int(level), logits[rows, int(level), :])
    return exits, expected


def point_answer_threshold(
    expected_accuracy: np.ndarray, correct: np.ndarray, target_accuracy: float, grid: np.ndarray | None = None
) -> AnswerRule:
    """The lowest ρ whose *measured* accuracy on answered rows is >= α: a point estimate (kind ``point``)."""
    e, c = _check_rows(expected_accuracy, correct)
    values = np.sort(np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64).ravel())
    for rho in values:
        ans = answered_mask(e, rho)
        if ans.any() and float(c[ans].mean()) >= float(target_accuracy) - 1e-12:
            return AnswerRule(
                threshold=float(rho),
                kind="point",
                target_accuracy=float(target_accuracy),
                n=int(e.size),
                coverage=float(ans.mean()),
                answered_accuracy=float(c[ans].mean()),
            )
    return AnswerRule(
        threshold=float(values[-1]),
        kind="point",
        target_accuracy=float(target_accuracy),
        n=int(e.size),
        **_measured(e, c, float(values[-1])),
    )


def rule_for_point(
    policy: Any,
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    mode: str,
    certified: bool,
    target_accuracy: float | None,
    risk: float,
    bound: str,
    accuracy_lower_bound: float | None,
) -> AnswerRule:
    """The answer rule that goes with an exit rule chosen on the same calibrate rows.

    - the exit rule is certified: ρ = 0 (answering everything is what its certificate covers);
    - certified mode, nothing certified (the served exit rule is the most conservative grid value,
      fixed before the data): the ρ fixed sequence at that point (:func:`choose_answer_threshold`);
      when no ρ certifies either, ρ = 1 (kind ``not_certified``: nearly everything declined), except
      where the rows are too few to certify α even with zero errors: then the point-estimate ρ
      (kind ``point``, labelled "no guarantee").
      It runs only after the exit-rule sequence failed at its first point, so its risk is η when
      answered accuracy does not rise as ρ falls (a monotone map), and at most 2η by a union bound
      otherwise (docs/architecture.md, "Selective answering");
    - point mode: the lowest ρ with measured answered accuracy >= α (no guarantee);
    - no accuracy target (budget mode): no rule.
    """
    if target_accuracy is None or mode == "budget":
        return NO_RULE
    exits, expected = expected_at_exit(policy, logits)
    correct = np.asarray(logits)[np.arange(exits.size), exits].argmax(-1) == np.asarray(labels)
    if mode == "point":
        return point_answer_threshold(expected, correct, target_accuracy)
    if certified:
        return AnswerRule(
            threshold=0.0,
            kind="certified",
            target_accuracy=float(target_accuracy),
            risk=float(risk),
            bound=bound,
            n=int(exits.size),
            coverage=1.0,
            answered_accuracy=float(correct.mean()),
            accuracy_lower_bound=accuracy_lower_bound,
        )

    rule = choose_answer_threshold(expected, correct, target_accuracy, risk, bound)
    if rule.kind == "not_certified" and best_possible_accuracy(int(exits.size), risk, bound) < target_accuracy:
        # too few rows to certify α even with zero errors: answer what measured >= α on them, labelled a point
        # estimate (no guarantee), rather than decline everything for want of rows. With enough rows and still no
        # certified ρ, the evidence is that no share of the traffic reaches α: ρ = 1 declines (nearly) all
        rule = point_answer_threshold(expected, correct, target_accuracy)
    return rule

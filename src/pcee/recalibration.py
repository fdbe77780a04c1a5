"""Online recalibration: refit a PCEE-type policy's reliability maps on recent labelled traffic.

A reliability map is fit on validation data; when traffic shifts, confidence stops meaning the
same accuracy and PCEE(δ) under-delivers (the control *shortfall* max(0, δ − accuracy) grows).
Given recent labelled rows (all exits' logits, labels), this module

1. splits them (seeded) into a *refit* part and a *held-out* part;
2. refits every exit's map on the old validation statistics **plus** the refit rows, each recent
   row weighted by ``w`` (the rule below), so recent data dominate where they exist and the old
   validation counts still fill the bins the recent rows do not reach;
3. chooses what the refit maps serve and gates on the held-out rows; the old policy is never
   modified. Two gates:

   * **certified** (a risk-controlled policy, which certifies itself, or PCEE / PCEE-WS given the
     champion's certificate ``target_accuracy`` α, ``risk`` η, ``bound``): the served threshold
     is chosen *again* on the held-out rows, with the refit maps, by the Learn-then-Test
     fixed-sequence test of :mod:`pcee.operating_point` (δ from the most conservative value
     down; the cheapest δ before the first failure of "(1 − η) upper bound on the error <= 1 − α").
     Risk-controlled PCEE does this with its own :meth:`certify`, so its ``grid_``, ``errors_``,
     ``ucb_`` and ``delta_`` always belong to the maps it serves. The refit is accepted as
     certified (``status="certified"``, answer threshold ρ = 0) when a point certifies. When none
     does (a shift that even the final exit cannot absorb), the most conservative point is served
     with an answer rule (:func:`pcee.selective.rule_for_point`): ρ certified on the held-out rows
     (``status="selective"``: accuracy on *answered* requests >= α with probability >= 1 − η, the rest
     abstain or defer); when no ρ certifies either, ρ = 1 (or a point-estimate ρ where the held-out
     rows are too few to certify α at all), served
     (``status="conservative"``, ``certified`` False, and every report says so) when it beats the old
     maps' held-out shortfall or when the held-out rows show the old maps miss α (their (1 − η) upper
     bound on accuracy is below α: evidence of a miss, not too few rows to certify); otherwise
     ``status="not_certified"`` and nothing is served from it. The old maps' held-out accuracy at
     *their* served threshold is reported next to it. Certified use needs enough held-out rows: with
     ``n`` of them the best certifiable accuracy is ``pcee.operating_point.best_possible_accuracy(n, η, bound)``.
   * **shortfall** (PCEE / PCEE-WS without a certificate): PCEE at the served δ with the old and
     the new maps; accepted (``status="improved"``) when the held-out shortfall max(0, δ − accuracy)
     improves.

   The served threshold is always the policy's own :meth:`served_threshold` (for risk-controlled
   PCEE the certified δ', never the floor of its grid, the ``delta`` parameter).

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

from pcee.calibration.bounds import check_bound, loss_upper_bound
from pcee.calibration.ltt import (
    DEFAULT_BOUND,
    DEFAULT_RISK,
    best_possible_accuracy,
    check_target,
    closed_form_exits,
    fixed_sequence_passes,
)
from pcee.calibration.reliability_map import ExitReliabilityMaps, ReliabilityMap
from pcee.calibration.scores import confidence
from pcee.policies.base import ExitPolicy
from pcee.policies.pcee import PCEEPolicy
from pcee.policies.risk_controlled import RiskControlledPCEEPolicy
from pcee.selective import AnswerRule, rule_for_point

STATUSES = (
    "improved",
    "not_improved",
    "certified",
    "selective",
    "conservative",
    "not_certified",
    "too_few_labels",
    "suspect_labels",
)
#: statuses whose refit policy may be served
ACCEPTED = ("improved", "certified", "selective", "conservative")
GATES = ("certificate", "shortfall")


@dataclass(frozen=True)
class RecalibrationResult:
    """Outcome of :func:`recalibrate`. ``policy`` is the refit policy (None when nothing was refit).

    ``delta`` is the accuracy the shortfalls are measured against: the served δ (shortfall gate)
    or the certified target α (certificate gate). ``old_threshold`` / ``new_threshold`` are the
    thresholds the old and the refit policy serve (``served_threshold()``; None when nothing is
    certified and every sample goes to the final exit). ``accuracy_lower_bound`` is 1 − the
    (1 − η) upper bound on the refit policy's error at ``new_threshold`` over the ``n_holdout``
    held-out rows (the certificate's evidence), ``old_accuracy_lower_bound`` the same for the old
    policy at its own threshold (for comparison). ``certified`` says whether the refit policy's
    served point passed the fixed-sequence test; when it did not, ``policy`` holds the most
    conservative point, served (``status="conservative"``) only when it improves the held-out shortfall.
    :attr:`reason` explains the outcome from these fields.
    """

    status: str
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
    gate: str = "shortfall"
    old_threshold: float | None = None
    new_threshold: float | None = None
    certified: bool = False
    target_accuracy: float | None = None
    risk: float | None = None
    bound: str | None = None
    accuracy_lower_bound: float | None = None
    old_accuracy_lower_bound: float | None = None
    best_certifiable_accuracy: float | None = None
    seed: int = 0
    min_labels: int | None = None
    #: the answer rule ρ chosen with the refit maps on the held-out rows (``AnswerRule.to_dict()``)
    answer_rule: dict[str, Any] | None = None
    #: labelled rows skipped because their label is not one of the model's classes (never refit on)
    n_impossible_labels: int = 0
    #: :func:`label_agreement_check` on the labelled rows (labels copied from the served answers?)
    label_check: dict[str, Any] | None = None
    policy: ExitPolicy | None = field(default=None, repr=False, compare=False)

    @property
    def accepted(self) -> bool:
        """Whether the refit policy may be served (shortfall improved, or its point is certified)."""
        return self.status in ACCEPTED

    @property
    def improved(self) -> bool:
        """Same as :attr:`accepted` (the name predates the certificate gate)."""
        return self.accepted

    # -- explanations, one per outcome ---------------------------------------------------------
    @property
    def reason(self) -> str:
        """One paragraph: what was decided and the numbers behind it, then what the labels' checks found."""
        if self.status == "too_few_labels":
            return f"{self.n_labels} labelled rows, need at least {self.min_labels}: maps unchanged" + self._skipped()
        if self.status == "suspect_labels":
            return f"{self._suspect()}; maps unchanged" + self._skipped()
        if self.gate == "shortfall":
            told = self._shortfall_reason()
        else:
            told = {
                "certified": self._certified_reason,
                "selective": self._selective_reason,
            }.get(self.status, self._not_certified_reason)()
        flagged = self.label_check is not None and self.label_check.get("flagged")
        return told + self._skipped() + (f"; WARNING: {self._suspect()}" if flagged else "")

    def _skipped(self) -> str:
        n = self.n_impossible_labels
        return f"; {n} labelled row(s) skipped: label not a class of the model" if n else ""

    def _suspect(self) -> str:
        check = self.label_check or {}
        return (
            f"the labels agree with the served answers far more often than the final exit does ({check.get('b')} rows "
            f"side with the served answer against the final exit, {check.get('c')} the other way; sign test p = "
            f"{float(check.get('p_value', 1.0)):.2g} <= {float(check.get('risk', 0.0)):g}): they may be copied from the served answers"
        )

    def _old_part(self) -> str:
        return (
            f"old maps at their threshold {_fmt(self.old_threshold)}: held-out accuracy {self.old_accuracy:.4f} "
            f"(lower bound {self.old_accuracy_lower_bound:.4f})"
        )

    def _shortfall_reason(self) -> str:
        return (
            f"held-out shortfall at delta={self.delta:.3f}: {self.old_shortfall:.4f} (old maps) -> {self.new_shortfall:.4f} (refit maps)"
            + ("" if self.accepted else "; not an improvement: maps unchanged")
        )

    def _certified_reason(self) -> str:
        return (
            f"refit maps certified on {self.n_holdout} held-out rows: accuracy >= {self.target_accuracy:g} with probability >= "
            f"{1 - float(self.risk or 0):.2f} ({self.bound} bound) at threshold {_fmt(self.new_threshold)}, held-out accuracy "
            f"{self.new_accuracy:.4f}, lower bound {self.accuracy_lower_bound:.4f}; {self._old_part()}"
        )

    def _selective_reason(self) -> str:
        rule = self.answer_rule or {}
        return (
            f"no threshold of the refit maps certifies accuracy >= {self.target_accuracy:g} on all {self.n_holdout} held-out "
            f"rows; the answer rule does: requests with expected accuracy >= ρ = {rule['threshold']:.4g} are answered, accuracy "
            f"on answered >= {self.target_accuracy:g} with probability >= {1 - float(self.risk or 0):.2f} ({self.bound} bound, "
            f"answered-accuracy lower bound {rule['accuracy_lower_bound']:.4f}) at coverage {rule['coverage']:.3f}; the rest "
            f"abstain or defer; {self._old_part()}"
        )

    def _not_certified_reason(self) -> str:
        rule = self.answer_rule or {}
        possible = best_possible_accuracy(self.n_holdout, float(self.risk or 0.1), str(self.bound))
        too_few = (
            f", and {self.n_holdout} rows cannot certify more than {possible:.4f} even with zero errors"
            if possible < float(self.target_accuracy or 0.0)
            else ""
        )
        served = (
            f"): NOT certified; serving the most conservative point of the refit maps (held-out accuracy {self.new_accuracy:.4f}, "
            f"shortfall {self.old_shortfall:.4f} -> {self.new_shortfall:.4f}) with answer threshold ρ = {rule['threshold']:.4g} "
            f"({rule['kind']}: {AnswerRule.from_dict(rule).guarantee}); {self._old_part()}"
            if self.status == "conservative"
            else f"): maps unchanged, nothing served from the refit; {self._old_part()}"
        )
        return (
            f"no threshold of the refit maps certifies accuracy >= {self.target_accuracy:g} at risk {self.risk:g} on "
            f"{self.n_holdout} held-out rows ({self.bound} bound; best certifiable {self.best_certifiable_accuracy:.4f}"
            f"{too_few}{served}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the policy object), with the :attr:`reason`."""
        return {**{k: v for k, v in self.__dict__.items() if k != "policy"}, "reason": self.reason}

    def certificate(self) -> dict[str, Any] | None:
        """The refit policy's operating point as ``OperatingPoint.to_dict()`` keys, or None (shortfall gate).

        The refit rows play the *fit* part, the held-out rows the *calibrate* part; no test rows.
        """
        if self.gate != "certificate" or self.policy is None:
            return None
        policy = self.policy
        value = float(
            getattr(policy, policy.param_name)
        )  # δ for PCEE, α for risk-controlled (its δ' is the served threshold)
        return {
            "policy_name": policy.name,
            "param_name": policy.param_name,
            "value": value,
            "served_threshold": self.new_threshold,
            "mode": "certified",
            "target_accuracy": self.target_accuracy,
            "flops_budget": None,
            "risk": self.risk,
            "bound": self.bound,
            "certified": bool(self.certified),
            "n_fit": self.n_refit,
            "n_calibrate": self.n_holdout,
            "calibrate_fraction": self.n_holdout / self.n_labels if self.n_labels else None,
            "seed": self.seed,
            "calibrate_accuracy": self.new_accuracy,
            "accuracy_lower_bound": self.accuracy_lower_bound,
            "relative_cost": self.new_relative_cost,
            "mean_flops": None,
            "best_certifiable_accuracy": self.best_certifiable_accuracy,
            "test_accuracy": None,
            "test_relative_cost": None,
            "n_test": None,
            "answer_rule": self.answer_rule,
        }


def champion_certificate(meta: dict | None, tags: dict | None = None) -> dict[str, Any]:
    """The certificate a served model carries, as ``recalibrate`` keyword arguments (empty: none).

    Read from the bundle meta's ``operating_point`` (``OperatingPoint.to_dict()``, written by the
    train flow) when present: a ``certified``-mode point gives ``target_accuracy``, ``risk`` and
    ``bound``; any other mode (a point estimate, a budget) carries no accuracy certificate. Without
    it, the version tags ``target_accuracy`` (and ``risk``, ``bound``, ``mode`` when tagged) are used.
    """
    op = (meta or {}).get("operating_point")
    if isinstance(op, dict):
        if op.get("mode", "certified") not in ("certified", "label_free") or op.get("target_accuracy") is None:
            return {}
        out: dict[str, Any] = {"target_accuracy": float(op["target_accuracy"])}
        if op.get("risk") is not None:
            out["risk"] = float(op["risk"])
        if op.get("bound"):
            out["bound"] = str(op["bound"])
        return out
    tags = tags or {}
    if (
        str(tags.get("mode") or "certified") not in ("certified", "label_free")
        or not str(tags.get("target_accuracy") or "").strip()
    ):
        return {}
    out = {"target_accuracy": float(tags["target_accuracy"])}
    if str(tags.get("risk") or "").strip():
        out["risk"] = float(tags["risk"])
    if str(tags.get("bound") or "").strip():
        out["bound"] = str(tags["bound"])
    return out


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


def policy_maps(policy: ExitPolicy) -> ExitReliabilityMaps:
    """The fitted per-exit reliability maps of a PCEE-type policy."""
    maps = getattr(policy, "maps_", None)
    if not isinstance(maps, ExitReliabilityMaps) or not hasattr(maps, "maps_"):
        raise ValueError(
            f"policy {getattr(policy, 'name', type(policy).__name__)!r} has no fitted reliability maps; "
            "recalibration works on fitted PCEE-type policies (pcee, pcee-ws, risk-controlled)"
        )
    return maps


def _pcee_type(policy: ExitPolicy) -> PCEEPolicy:
    """``policy`` as the PCEE-type policy whose maps :func:`policy_maps` found (ValueError otherwise)."""
    if not isinstance(policy, PCEEPolicy):
        raise ValueError(
            f"policy {getattr(policy, 'name', type(policy).__name__)!r} is not a PCEE-type policy; "
            "recalibration works on fitted PCEE-type policies (pcee, pcee-ws, risk-controlled)"
        )
    return policy


def refit_map(old: ReliabilityMap, scores: np.ndarray, correct: np.ndarray, weight: float) -> ReliabilityMap:
    """A new map on the old map's edges: old bin evidence plus recent rows weighted ``weight``
    (:meth:`ReliabilityMap.refit_with`)."""
    return old.refit_with(scores, correct, weight)


def refit_policy(policy: ExitPolicy, logits: np.ndarray, labels: np.ndarray, weight: float) -> PCEEPolicy:
    """A copy of ``policy`` whose maps are refit with recent rows (logits (N, L, K), labels (N,))."""
    correct = logits.argmax(axis=-1) == labels[:, None]  # (N, L)
    return refit_policy_soft(policy, logits, correct.astype(np.float64), weight)


def refit_policy_soft(policy: ExitPolicy, logits: np.ndarray, correct: np.ndarray, weight: float) -> PCEEPolicy:
    """A copy of ``policy`` whose maps are refit with recent rows whose correctness (N, L) is a
    probability in [0, 1]: 0/1 from labels, or an estimate without labels (:mod:`pcee.label_free`)."""
    old_maps = policy_maps(policy)
    pcee_policy = _pcee_type(policy)
    scores = confidence(logits, old_maps.score)  # (N, L)
    correct = np.asarray(correct, dtype=np.float64)
    if correct.shape != scores.shape:
        raise ValueError(f"correct must be (N, L) = {scores.shape}, got shape {correct.shape}")
    new_maps = ExitReliabilityMaps(**old_maps.get_params())
    new_maps.maps_ = [
        refit_map(old_maps.maps_[level], scores[:, level], correct[:, level], weight)
        for level in range(len(old_maps.maps_))
    ]
    new_policy = type(pcee_policy).from_dict(
        pcee_policy.to_dict()
    )  # an independent copy: the served policy stays as it is
    new_policy.maps_ = new_maps
    return new_policy


def split_recent(n: int, holdout_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, refit) row indices of ``n`` recent rows: seeded, disjoint, both non-empty.

    The held-out rows come in a seeded random order (the WSR bound reads losses as a sequence).
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 rows to split, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_hold = min(max(1, int(round(holdout_fraction * n))), n - 1)
    return order[:n_hold], order[n_hold:]


def certify_on_grid(
    policy: PCEEPolicy,
    logits: np.ndarray,
    labels: np.ndarray,
    target_accuracy: float,
    risk: float,
    bound: str,
    grid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Fixed-sequence (Learn-then-Test) test of a closed-form policy's parameter with its current maps.

    The grid (default ``default_grid()``) is tested from the most conservative value; a value
    passes when 1 − the (1 − η) upper bound on its error over the rows is >= α; testing stops at
    the first failure (as in :func:`pcee.operating_point.choose_operating_point`, certified mode).
    Exits come in closed form from ``map_values``: a sample leaves at the number of running-maximum
    map values below δ, so a smaller δ never exits later and the cheapest passed value is the last.

    Returns (values, most conservative first; accuracy lower bounds (G,); n_pass). The certified
    value is ``values[n_pass - 1]`` when ``n_pass > 0``. The rows must not have fitted the maps.
    """
    if not policy.sweeps_in_closed_form or not policy.conservative_high:
        raise ValueError(f"policy {policy.name!r} does not sweep its parameter in closed form from its maps")
    values = np.asarray(type(policy).default_grid() if grid is None else grid, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("the parameter grid is empty")
    values = np.sort(values)[::-1]
    exits = closed_form_exits(policy.map_values(logits), values)  # (G, N)
    correct = logits.argmax(axis=-1) == labels[:, None]  # (N, L)
    hit = correct[np.arange(labels.shape[0])[None, :], exits]  # (G, N)
    lower = 1.0 - loss_upper_bound((~hit).astype(np.float64), float(risk), bound)
    return values, lower, fixed_sequence_passes(lower, target_accuracy)


def _threshold(policy: ExitPolicy) -> float | None:
    t = float(policy.served_threshold())
    return t if np.isfinite(t) else None


@dataclass(frozen=True)
class HeldOut:
    """One policy on the held-out rows: accuracy, shortfall vs the gate's reference, relative cost and
    the (1 − η) bounds on accuracy (None without a certificate). An upper bound below α is evidence
    that the policy misses α (not merely too few rows to certify that it meets it)."""

    accuracy: float
    shortfall: float
    relative_cost: float | None
    lower: float | None
    upper: float | None


def _held_out(
    policy: ExitPolicy, logits: np.ndarray, labels: np.ndarray, gate: Gate, flops: np.ndarray | None
) -> HeldOut:
    exits = policy.decide(logits)
    right = (logits[np.arange(len(exits)), exits].argmax(axis=-1) == labels).astype(np.float64)
    accuracy = float(right.mean())
    cost = None if flops is None else float(np.asarray(flops, dtype=np.float64)[exits].mean() / float(flops[-1]))
    lower = upper = None
    if gate.risk is not None and gate.bound is not None:
        lower = float(1.0 - loss_upper_bound(1.0 - right, float(gate.risk), gate.bound)[0])
        upper = float(loss_upper_bound(right, float(gate.risk), gate.bound)[0])
    return HeldOut(accuracy, max(0.0, gate.reference - accuracy), cost, lower, upper)


def possible_labels(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The rows whose label is one of the model's classes, [0, K) for (N, L, K) logits, and how many
    were skipped: a label outside them (a careless or hostile client's) must never reach a refit."""
    possible = (labels >= 0) & (labels < logits.shape[2])
    skipped = int(labels.shape[0] - possible.sum())
    return (logits, labels, 0) if skipped == 0 else (logits[possible], labels[possible], skipped)


def label_agreement_check(policy: ExitPolicy, logits: np.ndarray, labels: np.ndarray, risk: float = 0.01) -> dict:
    """A cheap check for labels copied from the served answers (a client that makes the model look right).

    Honest labels agree with the served answer no more often than the final exit does, where the two
    differ in the other direction: on rows where exactly one of "label = served answer" and "final
    exit = served answer" holds, the first (``b`` rows: the early answer right and the final exit
    wrong) is not the more frequent one for a final exit at least as accurate as the early exits.
    Labels copied from the served answer move every such row into ``b``. One-sided sign test:
    ``flagged`` when P(Binomial(b + c, 1/2) >= b) <= ``risk``. No labels are trusted to compute it
    beyond the ones under test; the final exit's answers are computed from the rows' logits (the
    shadow-row view of the same rows)."""
    from scipy.stats import binom

    exits = np.asarray(policy.decide(logits), dtype=np.int64)
    served = logits[np.arange(exits.size), exits].argmax(-1)
    final = logits[:, -1].argmax(-1)
    label_served, final_served = labels == served, final == served
    b = int((label_served & ~final_served).sum())
    c = int((~label_served & final_served).sum())
    p_value = float(binom.sf(b - 1, b + c, 0.5)) if b + c else 1.0
    return {
        "label_agrees_with_served": float(label_served.mean()) if labels.size else None,
        "final_agrees_with_served": float(final_served.mean()) if labels.size else None,
        "b": b,
        "c": c,
        "p_value": p_value,
        "risk": float(risk),
        "flagged": bool(p_value <= risk),
    }


def _fmt(v: float | None) -> str:
    return "none (final exit)" if v is None else f"{v:.4g}"


@dataclass(frozen=True)
class Gate:
    """What a refit is judged by: ``certificate`` (α, η, bound; the threshold is chosen again on the
    held-out rows) or ``shortfall`` (at the served δ, ``reference``)."""

    kind: str
    reference: float
    target_accuracy: float | None = None
    risk: float | None = None
    bound: str | None = None
    self_certified: bool = False

    @property
    def certificate(self) -> tuple[float, float, str]:
        """(α, η, bound) of a certificate gate."""
        if self.target_accuracy is None or self.risk is None or self.bound is None:
            raise RuntimeError("the shortfall gate carries no certificate")
        return float(self.target_accuracy), float(self.risk), str(self.bound)


def gate_for(
    policy: PCEEPolicy,
    delta: float | None = None,
    target_accuracy: float | None = None,
    risk: float | None = None,
    bound: str | None = None,
) -> Gate:
    """The gate of :func:`recalibrate` (its parameters' doc): a certificate when α is given or the policy
    certifies itself, else the shortfall at δ."""
    self_certified = policy.certifies_itself
    if not (self_certified or target_accuracy is not None):
        if risk is not None or bound is not None:
            raise ValueError("risk and bound belong to a certificate: pass target_accuracy with them")
        return Gate("shortfall", float(policy.served_threshold()) if delta is None else float(delta))
    if delta is not None:
        raise ValueError(
            "delta is chosen by the certificate on the held-out rows; do not pass it with a certified policy"
        )
    if self_certified:
        if not callable(getattr(policy, "certify", None)):
            raise ValueError(
                f"policy {policy.name!r} certifies itself but has no certify(logits, labels) to re-run on held-out rows"
            )
        own = policy.get_params()
        target_accuracy = float(own[policy.param_name] if target_accuracy is None else target_accuracy)
        risk = float(own["eta"] if risk is None else risk)
        bound = str(own["bound"] if bound is None else bound)
    alpha = float(target_accuracy)  # type: ignore[arg-type]
    risk = DEFAULT_RISK if risk is None else float(risk)
    bound = DEFAULT_BOUND if bound is None else str(bound)
    check_target(alpha, risk)
    check_bound(bound)
    return Gate("certificate", alpha, alpha, risk, bound, self_certified)


def _checked(policy: ExitPolicy, logits: np.ndarray, labels: np.ndarray, holdout_fraction: float):
    """(PCEE-type policy, its maps, logits float32, labels int64), or a ValueError naming the problem."""
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
    return _pcee_type(policy), maps, logits, labels


def _certify_refit(
    new_policy: PCEEPolicy, param: str, logits: np.ndarray, labels: np.ndarray, gate: Gate
) -> tuple[bool, float | None]:
    """Choose the refit policy's threshold again on the held-out rows (in place); (certified, best lower bound)."""
    if gate.kind != "certificate":
        return False, None
    if gate.self_certified:
        if not isinstance(new_policy, RiskControlledPCEEPolicy):
            raise ValueError(f"policy {new_policy.name!r} certifies itself but is not a risk-controlled PCEE policy")
        new_policy.set_params(**{param: gate.target_accuracy, "eta": gate.risk, "bound": gate.bound})
        new_policy.certify(logits, labels)  # grid_, errors_, ucb_, delta_ now belong to the refit maps
        return bool(new_policy.certified_), float(1.0 - new_policy.ucb_[0]) if len(new_policy.ucb_) else None
    values, lower, n_pass = certify_on_grid(new_policy, logits, labels, *gate.certificate)
    # uncertified: the most conservative point (as the operating-point pipeline serves), never to be served
    new_policy.set_params(**{param: float(values[n_pass - 1] if n_pass > 0 else values[0])})
    return n_pass > 0, float(lower[0])


def _refit_answer_rule(
    new_policy: PCEEPolicy, logits: np.ndarray, labels: np.ndarray, gate: Gate, certified: bool, lower: float | None
) -> dict[str, Any] | None:
    """Certified: ρ = 0 with the exit rule's own bound; nothing certified: the ρ fixed sequence at the most
    conservative point (:func:`pcee.selective.rule_for_point`); shortfall gate: no rule."""
    if gate.kind != "certificate":
        return None
    alpha, risk, bound = gate.certificate
    rule = rule_for_point(
        new_policy,
        logits,
        labels,
        mode="certified",
        certified=certified,
        target_accuracy=alpha,
        risk=risk,
        bound=bound,
        accuracy_lower_bound=None,
    ).to_dict()
    if certified:
        rule["accuracy_lower_bound"] = lower  # ρ = 0: the exit rule's own bound
    return rule


def _status(
    gate: Gate, certified: bool, rule: dict[str, Any] | None, old: HeldOut, new: HeldOut, min_improvement: float
) -> str:
    """The gate's verdict. Certificate: certified, selective (only an answer rule certifies), conservative
    (nothing certifies, but the refit beats the old maps' held-out shortfall, or the held-out rows show the
    old maps miss α too), else not_certified. Shortfall: improved or not_improved."""
    better = new.shortfall < old.shortfall - float(min_improvement)
    if gate.kind != "certificate":
        return "improved" if better else "not_improved"
    if certified:
        return "certified"
    if rule is not None and rule["kind"] == "certified":
        return "selective"
    old_misses = old.upper is not None and old.upper < gate.certificate[0]
    return "conservative" if better or old_misses else "not_certified"


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
    target_accuracy: float | None = None,
    risk: float | None = None,
    bound: str | None = None,
    label_check_risk: float = 0.01,
    refuse_suspect_labels: bool = False,
) -> RecalibrationResult:
    """Refit ``policy``'s maps on recent labelled rows and gate on a held-out part of them.

    Parameters
    ----------
    policy : fitted PCEE-type policy (has reliability maps); never modified.
    logits : (N, L, K) all exits' logits of the recent labelled rows; ``labels`` (N,).
    flops : (L,) cumulative cost, only to report relative cost.
    delta : shortfall gate only: the δ the shortfall is measured against (default: the served threshold).
    recent_share : aggregate share of the recent rows in each map (weight rule in the module doc).
    holdout_fraction : share of the rows kept out of the refit, for the gate (and the certificate).
    min_labels : fewer labelled rows → ``status="too_few_labels"``, nothing refit.
    min_improvement, seed : the new shortfall must beat the old by more than this; the split's seed.
    target_accuracy, risk, bound : the certificate (α, η, bound). Given α, a PCEE / PCEE-WS policy is
        *certified*: its δ is chosen again on the held-out rows with the refit maps (η defaults to
        ``pcee.operating_point.DEFAULT_RISK``, the bound to ``DEFAULT_BOUND``). A policy that
        certifies itself (risk-controlled) is always certified; given values replace its own
        α / η / bound on the refit copy.
    label_check_risk : level of :func:`label_agreement_check`, whose result is in ``label_check`` and, when
        it flags the labels, in ``reason``.
    refuse_suspect_labels : labels the check flags refit nothing (``status="suspect_labels"``). Off by
        default: its null (the final exit is right where it and the served answer disagree at least as
        often as the served answer) can fail for honest labels (benchmarks/label_noise.py measures it).

    Returns a :class:`RecalibrationResult`, ``status`` one of ``STATUSES`` (its ``reason`` says why); its
    ``policy`` is the refit policy (also when the gate rejects it; ``accepted`` says whether it may be served).
    """
    policy, maps, logits, labels = _checked(policy, logits, labels, holdout_fraction)
    logits, labels, n_impossible = possible_labels(logits, labels)
    gate = gate_for(policy, delta, target_accuracy, risk, bound)
    common = _common_fields(policy, gate, int(labels.shape[0]), seed, min_labels, n_impossible)
    if labels.shape[0] < max(int(min_labels), 2):
        return RecalibrationResult(status="too_few_labels", **common)
    common["label_check"] = label_agreement_check(policy, logits, labels, label_check_risk)
    if common["label_check"]["flagged"] and refuse_suspect_labels:
        return RecalibrationResult(status="suspect_labels", **common)
    return _refit_and_gate(
        policy,
        maps,
        logits,
        labels,
        gate,
        common,
        flops=flops,
        recent_share=recent_share,
        holdout_fraction=holdout_fraction,
        min_improvement=min_improvement,
        seed=seed,
    )


def _common_fields(
    policy: PCEEPolicy, gate: Gate, n_labels: int, seed: int, min_labels: int, n_impossible: int
) -> dict[str, Any]:
    """The :class:`RecalibrationResult` fields every outcome carries, refit or not."""
    return dict(
        delta=gate.reference,
        n_labels=n_labels,
        gate=gate.kind,
        old_threshold=_threshold(policy),
        target_accuracy=gate.target_accuracy,
        risk=gate.risk,
        bound=gate.bound,
        seed=int(seed),
        min_labels=int(min_labels),
        n_impossible_labels=n_impossible,
    )


def _refit_and_gate(
    policy: PCEEPolicy,
    maps: ExitReliabilityMaps,
    logits: np.ndarray,
    labels: np.ndarray,
    gate: Gate,
    common: dict[str, Any],
    *,
    flops: np.ndarray | None,
    recent_share: float,
    holdout_fraction: float,
    min_improvement: float,
    seed: int,
) -> RecalibrationResult:
    """Split the rows, refit a copy of ``policy`` on the refit part and judge both on the held-out part."""
    hold, refit = split_recent(int(labels.shape[0]), holdout_fraction, seed)
    weight = recent_weight(float(np.asarray(maps.maps_[0].counts_).sum()), len(refit), recent_share)
    new_policy = refit_policy(policy, logits[refit], labels[refit], weight)
    h_logits, h_labels = logits[hold], labels[hold]
    certified, best = _certify_refit(new_policy, policy.param_name, h_logits, h_labels, gate)
    old = _held_out(policy, h_logits, h_labels, gate, flops)
    new = _held_out(new_policy, h_logits, h_labels, gate, flops)
    rule = _refit_answer_rule(new_policy, h_logits, h_labels, gate, certified, new.lower)
    return RecalibrationResult(
        status=_status(gate, certified, rule, old, new, min_improvement),
        n_refit=int(len(refit)),
        n_holdout=int(hold.size),
        recent_weight=weight,
        old_accuracy=old.accuracy,
        new_accuracy=new.accuracy,
        old_shortfall=old.shortfall,
        new_shortfall=new.shortfall,
        old_relative_cost=old.relative_cost,
        new_relative_cost=new.relative_cost,
        new_threshold=_threshold(new_policy),
        certified=certified,
        accuracy_lower_bound=new.lower,
        old_accuracy_lower_bound=old.lower,
        best_certifiable_accuracy=best,
        answer_rule=rule,
        policy=new_policy,
        **common,
    )

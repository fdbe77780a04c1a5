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
from pcee.calibration.ltt import closed_form_exits, fixed_sequence_passes
from pcee.calibration.reliability_map import ExitReliabilityMaps, ReliabilityMap
from pcee.calibration.scores import confidence
from pcee.policies.base import ExitPolicy
from pcee.policies.pcee import PCEEPolicy
from pcee.policies.risk_controlled import RiskControlledPCEEPolicy
from pcee.selective import AnswerRule

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
    """

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the policy object)."""
        return {k: v for k, v in self.__dict__.items() if k != "policy"}

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


def _held_out(
    policy: ExitPolicy,
    logits: np.ndarray,
    labels: np.ndarray,
    reference: float,
    flops: np.ndarray | None,
    risk: float | None,
    bound: str | None,
) -> tuple[float, float, float | None, float | None, float | None]:
    """(accuracy, shortfall vs ``reference``, relative cost, accuracy lower bound, accuracy upper bound) on
    held-out rows; the bounds are (1 − η) bounds, None without a certificate. An upper bound below α is
    evidence that the policy misses α (not merely too few rows to certify that it meets it)."""
    exits = policy.decide(logits)
    right = (logits[np.arange(len(exits)), exits].argmax(axis=-1) == labels).astype(np.float64)
    accuracy = float(right.mean())
    cost = None if flops is None else float(np.asarray(flops, dtype=np.float64)[exits].mean() / float(flops[-1]))
    lower = upper = None
    if risk is not None and bound is not None:
        lower = float(1.0 - loss_upper_bound(1.0 - right, float(risk), bound)[0])
        upper = float(loss_upper_bound(right, float(risk), bound)[0])
    return accuracy, max(0.0, float(reference) - accuracy), cost, lower, upper


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
    delta : shortfall gate only: the δ the shortfall is measured against (default: the policy's
        served threshold). The certificate gate chooses the threshold itself.
    recent_share : aggregate share of the recent rows in each map (weight rule in the module doc).
    holdout_fraction : share of the rows kept out of the refit, for the gate (and the certificate).
    min_labels : fewer labelled rows → ``status="too_few_labels"``, nothing refit.
    min_improvement : shortfall gate: the new shortfall must be below the old one by more than this.
    seed : the refit/held-out split (:func:`split_recent`).
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

    Returns
    -------
    RecalibrationResult, ``status`` one of ``STATUSES``; ``policy`` holds the refit policy when
    the maps were refit (also when the gate rejects it, for inspection; ``accepted`` says whether
    it may be served).
    """
    from pcee.calibration.ltt import DEFAULT_BOUND, DEFAULT_RISK, best_possible_accuracy, check_target

    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 3:
        raise ValueError(f"logits must be (N, L, K), got shape {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be ({logits.shape[0]},), got shape {labels.shape}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    logits, labels, n_impossible = possible_labels(logits, labels)
    maps = policy_maps(policy)
    policy = _pcee_type(policy)
    if logits.shape[1] != len(maps.maps_):
        raise ValueError(f"logits have {logits.shape[1]} exits but the policy's maps cover {len(maps.maps_)}")

    self_certified = policy.certifies_itself
    certified_use = self_certified or target_accuracy is not None
    if certified_use:
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
        else:
            target_accuracy = float(target_accuracy)  # type: ignore[arg-type]
            risk = DEFAULT_RISK if risk is None else float(risk)
            bound = DEFAULT_BOUND if bound is None else str(bound)
        check_target(target_accuracy, risk)
        check_bound(bound)
        reference = float(target_accuracy)
    else:
        if risk is not None or bound is not None:
            raise ValueError("risk and bound belong to a certificate: pass target_accuracy with them")
        reference = float(policy.served_threshold()) if delta is None else float(delta)
    old_threshold = _threshold(policy)
    cert: dict[str, Any] = dict(
        gate="certificate" if certified_use else "shortfall",
        old_threshold=old_threshold,
        target_accuracy=target_accuracy,
        risk=risk,
        bound=bound,
        seed=int(seed),
        n_impossible_labels=n_impossible,
    )

    n = int(labels.shape[0])
    if n < max(int(min_labels), 2):
        return RecalibrationResult(
            status="too_few_labels",
            reason=f"{n} labelled rows, need at least {min_labels}: maps unchanged"
            + (f" ({n_impossible} more skipped: label not a class of the model)" if n_impossible else ""),
            delta=reference,
            n_labels=n,
            **cert,
        )
    check = label_agreement_check(policy, logits, labels, label_check_risk)
    cert["label_check"] = check
    suspect = (
        f"the labels agree with the served answers far more often than the final exit does ({check['b']} rows "
        f"side with the served answer against the final exit, {check['c']} the other way; sign test p = "
        f"{check['p_value']:.2g} <= {check['risk']:g}): they may be copied from the served answers"
    )
    if check["flagged"] and refuse_suspect_labels:
        return RecalibrationResult(
            status="suspect_labels", reason=f"{suspect}; maps unchanged", delta=reference, n_labels=n, **cert
        )
    hold, refit = split_recent(n, holdout_fraction, seed)
    n_hold = int(hold.size)
    n_reference = float(np.asarray(maps.maps_[0].counts_).sum())
    weight = recent_weight(n_reference, len(refit), recent_share)
    new_policy = refit_policy(policy, logits[refit], labels[refit], weight)
    h_logits, h_labels = logits[hold], labels[hold]

    certified, best = False, None
    if self_certified:
        if not isinstance(new_policy, RiskControlledPCEEPolicy):
            raise ValueError(f"policy {policy.name!r} certifies itself but is not a risk-controlled PCEE policy")
        new_policy.set_params(**{policy.param_name: target_accuracy, "eta": risk, "bound": bound})
        new_policy.certify(h_logits, h_labels)  # grid_, errors_, ucb_, delta_ now belong to the refit maps
        certified = bool(new_policy.certified_)
        best = float(1.0 - new_policy.ucb_[0]) if len(new_policy.ucb_) else None
    elif certified_use:
        values, lower, n_pass = certify_on_grid(new_policy, h_logits, h_labels, target_accuracy, risk, bound)  # type: ignore[arg-type]
        certified = n_pass > 0
        best = float(lower[0])
        # uncertified: the most conservative point (as the operating-point pipeline serves), never to be served
        new_policy.set_params(**{policy.param_name: float(values[n_pass - 1] if certified else values[0])})
    new_threshold = _threshold(new_policy)
    rule = None
    if certified_use:
        from pcee.selective import rule_for_point

        if risk is None or bound is None:
            raise RuntimeError("certified recalibration without risk and bound (they are set above)")
        # certified: ρ = 0; nothing certified: the ρ fixed sequence at the most conservative point (pcee.selective)
        rule = rule_for_point(
            new_policy,
            h_logits,
            h_labels,
            mode="certified",
            certified=certified,
            target_accuracy=target_accuracy,
            risk=risk,
            bound=bound,
            accuracy_lower_bound=None,
        ).to_dict()
    selective = certified_use and not certified and rule is not None and rule["kind"] == "certified"

    old_acc, old_short, old_cost, old_lower, old_upper = _held_out(
        policy, h_logits, h_labels, reference, flops, risk, bound
    )
    new_acc, new_short, new_cost, new_lower, _ = _held_out(
        new_policy, h_logits, h_labels, reference, flops, risk, bound
    )
    if rule is not None and certified:
        rule["accuracy_lower_bound"] = new_lower  # ρ = 0: the exit rule's own bound
    if certified_use:
        if target_accuracy is None or risk is None or bound is None or rule is None:
            raise RuntimeError("certified recalibration without its certificate or answer rule (they are set above)")
        # nothing certifies (a shift the final exit cannot absorb either): the most conservative point of the
        # refit maps (with its answer rule) is still served when it beats the old maps on the held-out rows, or when
        # the held-out rows show that the old maps miss the target too; it says it is not certified
        old_misses = old_upper is not None and old_upper < float(target_accuracy)
        conservative = not certified and (new_short < old_short - float(min_improvement) or old_misses)
        status = (
            "certified"
            if certified
            else "selective"
            if selective
            else "conservative"
            if conservative
            else "not_certified"
        )
        old_part = (
            f"old maps at their threshold {_fmt(old_threshold)}: held-out accuracy {old_acc:.4f} "
            f"(lower bound {old_lower:.4f})"
        )
        if selective:
            reason = (
                f"no threshold of the refit maps certifies accuracy >= {target_accuracy:g} on all {n_hold} held-out rows; the "
                f"answer rule does: requests with expected accuracy >= ρ = {rule['threshold']:.4g} are answered, accuracy on "
                f"answered >= {target_accuracy:g} with probability >= {1 - risk:.2f} ({bound} bound, answered-accuracy lower "
                f"bound {rule['accuracy_lower_bound']:.4f}) at coverage {rule['coverage']:.3f}; the rest abstain or defer; "
                f"{old_part}"
            )
        elif certified:
            reason = (
                f"refit maps certified on {n_hold} held-out rows: accuracy >= {target_accuracy:g} with probability >= "
                f"{1 - risk:.2f} ({bound} bound) at threshold {_fmt(new_threshold)}, held-out accuracy {new_acc:.4f}, "
                f"lower bound {new_lower:.4f}; {old_part}"
            )
        else:
            possible = best_possible_accuracy(n_hold, risk, bound)
            reason = (
                f"no threshold of the refit maps certifies accuracy >= {target_accuracy:g} at risk {risk:g} on {n_hold} "
                f"held-out rows ({bound} bound; best certifiable {best:.4f}"
                + (
                    f", and {n_hold} rows cannot certify more than {possible:.4f} even with zero errors"
                    if possible < target_accuracy
                    else ""
                )
                + (
                    f"): NOT certified; serving the most conservative point of the refit maps (held-out accuracy {new_acc:.4f}, "
                    f"shortfall {old_short:.4f} -> {new_short:.4f}) with answer threshold ρ = {rule['threshold']:.4g} "
                    f"({rule['kind']}: {AnswerRule.from_dict(rule).guarantee}); {old_part}"
                    if conservative
                    else f"): maps unchanged, nothing served from the refit; {old_part}"
                )
            )
    else:
        accepted = new_short < old_short - float(min_improvement)
        status = "improved" if accepted else "not_improved"
        reason = (
            f"held-out shortfall at delta={reference:.3f}: {old_short:.4f} (old maps) -> {new_short:.4f} (refit maps)"
            + ("" if accepted else "; not an improvement: maps unchanged")
        )
    cert.update(
        answer_rule=rule,
        new_threshold=new_threshold,
        certified=certified,
        accuracy_lower_bound=new_lower,
        old_accuracy_lower_bound=old_lower,
        best_certifiable_accuracy=best,
    )
    if n_impossible:
        reason += f"; {n_impossible} labelled row(s) skipped: label not a class of the model"
    if check["flagged"]:
        reason += f"; WARNING: {suspect}"
    return RecalibrationResult(
        status=status,
        reason=reason,
        delta=reference,
        n_labels=n,
        n_refit=int(len(refit)),
        n_holdout=n_hold,
        recent_weight=weight,
        old_accuracy=old_acc,
        new_accuracy=new_acc,
        old_shortfall=old_short,
        new_shortfall=new_short,
        old_relative_cost=old_cost,
        new_relative_cost=new_cost,
        policy=new_policy,
        **cert,
    )

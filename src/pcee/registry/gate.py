"""The promotion gate, pure logic: no MLflow here.

The gate decides on rows that neither fitting nor choosing saw for the challenger's *maps*: the
calibrate part of the validation split, read through a bound. A model "meets the target" when the
(1 - η) lower bound on its accuracy over those rows is >= α (for the challenger this is the
certificate of its operating point); in ``point`` mode, where no bound is promised, the plain
accuracy is used and the decision says so. A challenger is promoted when it meets the target and
does not cost more than the champion on the same rows, or when the champion does not meet it (or
there is none). Test accuracy is carried along as a check and never decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Evaluation:
    """How one model did on the gate's rows (and, as a check, on test)."""

    version: str | None
    accuracy: float
    mean_flops: float
    n: int
    accuracy_lower_bound: float | None = None  # (1 - η) lower bound on the gate rows; None in point mode
    test_accuracy: float | None = None  # a check, not used for deciding
    #: mean seconds per sample from the bundle's latency profile (pcee.latency), None without one
    mean_latency_s: float | None = None
    #: how that profile was timed (``LatencyProfile.method``): time is compared only between profiles timed alike
    latency_method: str | None = None

    @property
    def evidence(self) -> float:
        """The accuracy figure the gate compares with the target: the bound where there is one."""
        return self.accuracy if self.accuracy_lower_bound is None else self.accuracy_lower_bound


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    target_accuracy: float
    challenger: Evaluation
    champion: Evaluation | None
    rows: str = "calibrate part of validation"
    bound: str | None = None
    risk: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        basis = f"{self.bound} lower bound at risk {self.risk:g}" if self.bound else "point estimate (no guarantee)"
        rows = [
            "| model | version | accuracy on gate rows | accuracy lower bound | mean FLOPs | mean ms per sample (profile) | n "
            "| test accuracy (check, not used for choosing) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for role, ev in (("challenger", self.challenger), ("champion", self.champion)):
            if ev is not None:
                lb = "-" if ev.accuracy_lower_bound is None else f"{ev.accuracy_lower_bound:.4f}"
                ta = "-" if ev.test_accuracy is None else f"{ev.test_accuracy:.4f}"
                ms = "-" if ev.mean_latency_s is None else f"{1000 * ev.mean_latency_s:.4f}"
                rows.append(
                    f"| {role} | {ev.version} | {ev.accuracy:.4f} | {lb} | {ev.mean_flops:,.0f} | {ms} | {ev.n} | {ta} |"
                )
        verdict = "PROMOTE" if self.promote else "KEEP CHAMPION"
        return (
            f"**Gate: {verdict}** (target accuracy {self.target_accuracy:.3f}, judged on the {self.rows} by the {basis}): "
            f"{self.reason}\n\n" + "\n".join(rows)
        )


def gate(
    challenger: Evaluation,
    champion: Evaluation | None,
    target_accuracy: float,
    cost_tolerance: float = 0.0,
    *,
    rows: str = "calibrate part of validation",
    bound: str | None = None,
    risk: float | None = None,
) -> GateDecision:
    """Decide whether ``challenger`` replaces ``champion``.

    ``cost_tolerance`` is the relative extra cost allowed (0.0: not a single FLOP more). Each
    evaluation's ``evidence`` (its accuracy lower bound, else its accuracy) is compared with the target.
    """
    if not 0.0 <= target_accuracy <= 1.0:
        raise ValueError(f"target_accuracy must be in [0, 1], got {target_accuracy}")
    if cost_tolerance < 0:
        raise ValueError(f"cost_tolerance must be >= 0, got {cost_tolerance}")

    def decide(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, target_accuracy, challenger, champion, rows, bound, risk)

    what = "accuracy lower bound" if challenger.accuracy_lower_bound is not None else "accuracy"
    if challenger.evidence < target_accuracy:
        return decide(False, f"challenger {what} {challenger.evidence:.4f} misses the target {target_accuracy:.4f}")
    if champion is None:
        return decide(True, "challenger meets the target and there is no champion")
    if champion.evidence < target_accuracy:
        return decide(
            True,
            f"champion {what} {champion.evidence:.4f} misses the target; challenger {challenger.evidence:.4f} meets it",
        )
    # cost in time when both carry a latency profile timed the same way (on the serving machine), else
    # FLOPs: a runner-timed profile counts the decisions a segments-timed one leaves out
    new_s, old_s = challenger.mean_latency_s, champion.mean_latency_s
    if new_s is not None and old_s is not None and challenger.latency_method == champion.latency_method:
        new, old, unit, fmt = 1000 * new_s, 1000 * old_s, "ms per sample (latency profile)", ".4f"
    else:
        new, old, unit, fmt = challenger.mean_flops, champion.mean_flops, "FLOPs", ",.0f"
        if new_s is not None and old_s is not None:
            unit += (
                f" (their latency profiles were timed differently: {challenger.latency_method} vs"
                f" {champion.latency_method}; re-run pcee profile on the champion to compare in time)"
            )
    if new <= old * (1.0 + cost_tolerance):
        return decide(True, f"both meet the target; challenger costs {new:{fmt}} <= champion {old:{fmt}} {unit}")
    return decide(False, f"both meet the target but challenger costs {new:{fmt}} > champion {old:{fmt}} {unit}")

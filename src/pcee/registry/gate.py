"""The promotion gate (DESIGN.md §5), pure logic: no MLflow here.

A challenger is promoted when it meets the accuracy target on the evaluation rows and does not
cost more than the champion there, or when the champion itself fails the target (or there is
none). Both are evaluated on the same rows, each with its own chosen δ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Evaluation:
    """How one model did on the evaluation rows."""

    version: str | None
    accuracy: float
    mean_flops: float
    n: int


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    target_accuracy: float
    challenger: Evaluation
    champion: Evaluation | None

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        rows = ["| model | version | accuracy | mean FLOPs | n |", "|---|---|---|---|---|"]
        for role, ev in (("challenger", self.challenger), ("champion", self.champion)):
            if ev is not None:
                rows.append(f"| {role} | {ev.version} | {ev.accuracy:.4f} | {ev.mean_flops:,.0f} | {ev.n} |")
        verdict = "PROMOTE" if self.promote else "KEEP CHAMPION"
        return f"**Gate: {verdict}** (target accuracy {self.target_accuracy:.3f}): {self.reason}\n\n" + "\n".join(rows)


def gate(challenger: Evaluation, champion: Evaluation | None, target_accuracy: float, cost_tolerance: float = 0.0) -> GateDecision:
    """Decide whether ``challenger`` replaces ``champion``.

    ``cost_tolerance`` is the relative extra cost allowed (0.0: not a single FLOP more).
    """
    if not 0.0 <= target_accuracy <= 1.0:
        raise ValueError(f"target_accuracy must be in [0, 1], got {target_accuracy}")
    if cost_tolerance < 0:
        raise ValueError(f"cost_tolerance must be >= 0, got {cost_tolerance}")

    def decide(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, target_accuracy, challenger, champion)

    if challenger.accuracy < target_accuracy:
        return decide(False, f"challenger accuracy {challenger.accuracy:.4f} misses the target {target_accuracy:.4f}")
    if champion is None:
        return decide(True, "challenger meets the target and there is no champion")
    if champion.accuracy < target_accuracy:
        return decide(True, f"champion accuracy {champion.accuracy:.4f} misses the target; challenger {challenger.accuracy:.4f} meets it")
    limit = champion.mean_flops * (1.0 + cost_tolerance)
    if challenger.mean_flops <= limit:
        return decide(True, f"both meet the target; challenger costs {challenger.mean_flops:,.0f} <= champion {champion.mean_flops:,.0f} FLOPs")
    return decide(False, f"both meet the target but challenger costs {challenger.mean_flops:,.0f} > champion {champion.mean_flops:,.0f} FLOPs")

"""What a served version can say about α on the current traffic: its *verification* status.

One status per version, from its bundle meta (``verification``, written by the recalibrate flow), else
from its certificate:

- ``certified``: the operating point (or, when it needs one, the answer rule) is certified on labelled
  rows: accuracy on answered >= α with probability >= 1 − η;
- ``label-free lower bound``: after a drift alarm, no labels yet; requests are answered only where the
  label-free lower bound (:mod:`pcee.label_free_bound`) supports α; an estimate, not certified;
- ``unverified under drift``: after a drift alarm the label-free evidence cannot support α: every
  request is declined (best guess returned, flagged);
- ``not certified``: a point estimate or a budget point, no accuracy certificate.

A label-free version waits for labels: ``label_budget`` labels on the requests it served (the few-label
certification, :mod:`pcee.few_labels`, certifies its own answer rule on them); until a look certifies,
``/health`` and ``/metrics`` show "waiting for labels (n/150)". Each response carries the status that applies to it: a declined request of
a label-free version is "unverified under drift"; any other response, its version's status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CERTIFIED = "certified"
LOWER_BOUND = "label-free lower bound"
UNVERIFIED = "unverified under drift"
NOT_CERTIFIED = "not certified"
STATUSES = (CERTIFIED, LOWER_BOUND, UNVERIFIED, NOT_CERTIFIED)


@dataclass(frozen=True)
class Verification:
    """A version's verification status (bundle meta ``verification`` via :meth:`to_dict`)."""

    status: str
    label_budget: int | None = None  # labels the few-label certification waits for (label-free versions)
    reason: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown verification status {self.status!r}; valid: {', '.join(STATUSES)}")

    @property
    def waiting_for_labels(self) -> bool:
        return self.status in (LOWER_BOUND, UNVERIFIED) and self.label_budget is not None

    def labels_line(self, n_labels: int | None) -> str | None:
        """``waiting for labels (n/150)`` while waiting, else None."""
        if not self.waiting_for_labels:
            return None
        return f"waiting for labels ({'?' if n_labels is None else int(n_labels)}/{self.label_budget})"

    def response_status(self, answered: bool) -> str:
        """The status one response carries."""
        if not answered and self.status == LOWER_BOUND:
            return UNVERIFIED
        return self.status

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> Verification:
        """From a bundle's meta: its ``verification``, else its certificate (module doc)."""
        meta = meta or {}
        stored = meta.get("verification")
        if isinstance(stored, dict):
            known = {k: stored[k] for k in cls.__dataclass_fields__ if k in stored}
            return cls(**known)
        op = meta.get("operating_point") or {}
        rule = meta.get("answer_rule") or {}
        certified = bool(op.get("certified")) and op.get("mode", "certified") == "certified"
        return cls(CERTIFIED if certified or rule.get("kind") == "certified" else NOT_CERTIFIED)


@dataclass(frozen=True)
class LabelState:
    """What ``/health`` and ``/metrics`` show about a version's verification and the labels it waits for."""

    status: str
    labels: str | None  # "waiting for labels (n/150)", or None
    n_labels: int | None
    label_budget: int | None


def label_state(verification: Verification, version: str, count_labels: Callable[[str], int] | None) -> LabelState:
    """The verification line of served ``version``; ``count_labels(version)`` counts feedback on the requests
    it served (the traffic store's; None when the service has no store)."""
    n = None
    if verification.waiting_for_labels and count_labels is not None:
        n = int(count_labels(version))
    budget = verification.label_budget if verification.waiting_for_labels else None
    return LabelState(verification.status, verification.labels_line(n), n, budget)


__all__ = [
    "CERTIFIED",
    "LOWER_BOUND",
    "NOT_CERTIFIED",
    "STATUSES",
    "UNVERIFIED",
    "LabelState",
    "Verification",
    "label_state",
]

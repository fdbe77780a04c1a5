"""The exit-policy interface shared by PCEE, PCEE-WS and every baseline.

scikit-learn estimator shape: parameters in ``__init__``, learned state in trailing-underscore
attributes set by ``fit``, ``fit`` returns self, ``decide`` is pure.

Per-exit decisions (``exit_mask``) depend only on that exit's logits, so the early-exit runner
can decide after each segment; ``decide`` applies them to all exits at once ("first exit that
accepts; the last exit always answers"). The oracle needs labels and overrides ``decide``.

A policy carries everything about itself: the runner asks it for its per-exit rule in numpy and
torch forms and for its score (:meth:`ExitPolicy.exit_rule`, :mod:`pcee.policies.rules`), the sweep
for its grid (:meth:`ExitPolicy.sweep_grid`), the operating-point pipeline and recalibration for what
its flags say. Capabilities that come with methods are protocols (:class:`SelfCertifying`,
:class:`HasReliabilityMaps`), checked by :func:`as_self_certifying` and :func:`as_map_policy`, never
by a class or a name. Adding a policy is one file (a class with ``name`` and its rule) and one line in
:mod:`pcee.policies.registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Self, cast

import numpy as np

from pcee.policies.rules import AskPolicy

if TYPE_CHECKING:
    from pcee.calibration.reliability_map import ExitReliabilityMaps
    from pcee.policies.rules import ExitRule


class ExitPolicy:
    #: registry name, e.g. "pcee"
    name: str = ""
    #: name of the swept parameter (delta, tau, q, budget); stored in sweep.csv's ``delta`` column
    param_name: str = "delta"
    # -- what the policy says about itself (sweeps, the operating-point pipeline, the runner and
    #    recalibration read these instead of switching on names) --
    #: its parameter sweeps in closed form from ``map_values`` (no refit, no loop over values)
    sweeps_in_closed_form: bool = False
    #: its parameter is read as an accuracy target, so a shortfall max(0, value - accuracy) means something
    param_is_accuracy_target: bool = False
    #: a larger parameter value keeps samples to later exits (the operating-point fixed sequence starts there)
    conservative_high: bool = True
    #: it chooses and bounds its own served threshold on a held-out part of what it is fitted on
    certifies_itself: bool = False
    #: it needs labels to decide (the oracle): nothing to serve
    decides_with_labels: bool = False
    #: it has reliability maps (``maps_``, ``map_values``) that recalibration can refit (:class:`HasReliabilityMaps`)
    has_reliability_maps: bool = False
    #: the confidence score its rule reads (policies with a ``score`` parameter set it; the runner's
    #: answer columns use it)
    score: str = "max_prob"

    def exit_rule(self) -> ExitRule:
        """Its per-exit rule as of now, in numpy and torch forms (:mod:`pcee.policies.rules`), which the
        early-exit runner applies. This default asks ``exit_mask`` and ``expected_accuracy`` (numpy
        only: on a device the logits come to the host at each exit); the library's policies return a
        rule with a torch form and compute ``exit_mask`` through it."""
        return AskPolicy(self)

    @classmethod
    def sweep_grid(cls, deltas: np.ndarray) -> np.ndarray | None:
        """The values to sweep when a user gives a δ grid in [0, 1] (``pcee sweep --deltas``); None: its
        parameter lives on another scale, and it sweeps its own ``default_grid()``."""
        return None

    def fit(self, logits: np.ndarray, labels: np.ndarray, flops: np.ndarray) -> Self:
        """Fit on validation outputs: logits (N, L, K), labels (N,), cumulative flops (L,)."""
        raise NotImplementedError

    def exit_mask(self, level: int, logits: np.ndarray) -> np.ndarray:
        """Bool (N,): which samples leave at exit ``level`` (0-based, < L-1) given its logits (N, K)."""
        raise NotImplementedError

    def expected_accuracy(self, level: int, logits: np.ndarray) -> np.ndarray:
        """Float (N,): the policy's estimate of accuracy for samples answered at ``level``.

        PCEE returns its reliability-map value; policies without one return the confidence.
        """
        raise NotImplementedError

    def served_threshold(self) -> float:
        """The value its decisions apply now: δ for PCEE, the certified δ' for risk-controlled, τ, q, budget."""
        return float(getattr(self, self.param_name)) if self.param_name else float("nan")

    def decide(self, logits: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Exit index (N,) int64 in [0, L-1] for logits (N, L, K): the first accepting exit, else L-1."""
        n, num_exits, _ = logits.shape
        exits = np.full(n, num_exits - 1, dtype=np.int64)
        undecided = np.ones(n, dtype=bool)
        for level in range(num_exits - 1):
            leave = undecided & self.exit_mask(level, logits[:, level, :])
            exits[leave] = level
            undecided &= ~leave
        return exits


class SelfCertifying(Protocol):
    """A policy that chooses and bounds its own served threshold (``certifies_itself``): fitted, it holds
    the tested grid, the upper bounds on the error there and how many passed; ``certify`` re-runs the
    test on held-out rows with its current maps."""

    name: str
    param_name: str
    grid_: np.ndarray
    ucb_: np.ndarray
    n_pass_: int
    certified_: bool

    def fit(self, logits: np.ndarray, labels: np.ndarray, flops: np.ndarray) -> Any: ...

    def certify(self, logits: np.ndarray, labels: np.ndarray) -> Any: ...

    def exits_on_own_grid(self, logits: np.ndarray) -> np.ndarray: ...

    def set_params(self, **params: Any) -> Any: ...

    def served_threshold(self) -> float: ...


class HasReliabilityMaps(Protocol):
    """A policy with reliability maps (``has_reliability_maps``): fitted maps, their values per exit,
    a refit with sample weights."""

    name: str
    param_name: str
    maps_: ExitReliabilityMaps

    def fit(
        self, logits: np.ndarray, labels: np.ndarray, flops: np.ndarray | None = None, sample_weight: Any = None
    ) -> Any: ...

    def map_values(self, logits: np.ndarray) -> np.ndarray: ...

    def set_params(self, **params: Any) -> Any: ...

    def served_threshold(self) -> float: ...


def as_self_certifying(policy: ExitPolicy) -> SelfCertifying:
    """``policy`` as a :class:`SelfCertifying` one; TypeError naming what it lacks otherwise."""
    _check_protocol(policy, "certifies_itself", ("certify", "exits_on_own_grid", "set_params"))
    return cast(SelfCertifying, policy)


def as_map_policy(policy: ExitPolicy) -> HasReliabilityMaps:
    """``policy`` as one with reliability maps (:class:`HasReliabilityMaps`); TypeError naming what it lacks otherwise."""
    _check_protocol(policy, "has_reliability_maps", ("map_values", "set_params"))
    return cast(HasReliabilityMaps, policy)


def _check_protocol(policy: ExitPolicy, flag: str, methods: tuple[str, ...]) -> None:
    name = getattr(policy, "name", "") or type(policy).__name__
    if not getattr(policy, flag, False):
        raise TypeError(f"policy {name!r} does not say {flag}")
    missing = [m for m in methods if not callable(getattr(policy, m, None))]
    if missing:
        raise TypeError(f"policy {name!r} says {flag} but lacks {', '.join(missing)}")

"""The operating-point pipeline (sweep -> choose -> fit -> certificate): one chooser per mode, one entry point.

Data roles (docs/architecture.md, "Data roles"): the *validation* outputs are split, seeded and
stratified, into a **fit** part (reliability maps, temperatures, budget thresholds: whatever the
policy learns) and a **calibrate** part (choosing the served parameter and bounding its
accuracy). The **test** outputs, when given, are only *reported*, as a check; no test row
influences any choice here.

Modes
-----
``certified`` (default)
    Learn-then-Test (Angelopoulos et al. 2021) with fixed-sequence testing: the parameter grid is
    tested from the most conservative value (everyone at late exits) to the least; the null
    "accuracy of this point < α" is rejected when the (1 - η) upper bound on its error over the
    calibrate rows is <= 1 - α; testing stops at the first failure. Every point that passed is
    certified at once (family-wise error <= η), so the cheapest of them (on the calibrate rows)
    is returned: with probability >= 1 - η over calibration draws its population accuracy is >= α.
``point``
    The cheapest point whose accuracy *on the calibrate rows* is >= α: a point estimate, no
    guarantee, labelled as such wherever it appears.
``budget``
    The most accurate point whose mean relative cost is, with probability >= 1 - η, within the
    budget: fixed-sequence from the cheapest point upward on a cost upper bound.

Every policy goes through the same code: pcee-type policies sweep their δ in closed form (the
policy says so with ``sweeps_in_closed_form``); other policies change their parameter with
``set_params`` and refit on the fit part where the parameter changes the fit. Risk-controlled
PCEE certifies itself (``certifies_itself``): it is fitted on the whole validation outputs with
the same split, α, η and bound, and its certificate is read from it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pcee.calibration.bounds import BOUNDS, check_bound, loss_upper_bound
from pcee.calibration.ltt import (
    DEFAULT_BOUND,
    DEFAULT_CALIBRATE_FRACTION,
    DEFAULT_RISK,
    SMALL_CALIBRATION,
    best_possible_accuracy,
    calibrate_size,
    check_calibration_size,
    check_target,
    closed_form_exits,
    exits_from_running_max,
    fixed_sequence_passes,
    running_max,
    split_fit_calibrate,
)
from pcee.outputs import ExitOutputs
from pcee.policies.pcee import PCEEPolicy
from pcee.policies.registry import build_policy, get_policy_class
from pcee.selective import AnswerRule, rule_for_point

MODES = ("certified", "point", "budget")
#: the check column's label wherever test accuracy is shown next to a choice
CHECK_LABEL = "test accuracy (check, not used for choosing)"


class NoCertifiablePointError(ValueError):
    """No operating point certifies the target at this risk; names the best certifiable accuracy."""

    def __init__(self, message: str, best_certifiable_accuracy: float, n_calibrate: int) -> None:
        super().__init__(message)
        self.best_certifiable_accuracy = best_certifiable_accuracy
        self.n_calibrate = n_calibrate


def exits_on_grid(
    policy_name: str, params: dict[str, Any], fit: ExitOutputs, evaluate: ExitOutputs, values: np.ndarray
) -> tuple[Any, np.ndarray]:
    """(policy fitted on ``fit``, exits (G, N) on ``evaluate`` for every value of its parameter).

    Closed-form policies use their map values: with R the running maximum over non-final exits, a
    sample leaves at the number of R_l below δ. Others set the value and refit where it matters.
    """

    cls = get_policy_class(policy_name)
    values = np.asarray(values, dtype=np.float64).ravel()
    policy = build_policy(policy_name, **params)
    if cls.sweeps_in_closed_form:
        if not isinstance(policy, PCEEPolicy):
            raise TypeError(f"policy {policy_name!r} sweeps in closed form but has no reliability maps (map_values)")
        policy.fit(fit.logits, fit.labels, fit.flops)
        return policy, closed_form_exits(policy.map_values(evaluate.logits), values)
    exits = np.empty((values.size, len(evaluate)), dtype=np.int64)
    for i, v in enumerate(values):
        policy.set_params(**{cls.param_name: float(v)})
        if not policy.is_fitted:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # EERO: budgets below exit 1 are swept on purpose
                policy.fit(fit.logits, fit.labels, fit.flops)
        exits[i] = policy.decide(evaluate.logits)
    return policy, exits


# ---------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OperatingPoint:
    """A chosen operating point with the evidence behind it (JSON via :meth:`to_dict`).

    ``value`` is the served parameter (δ for PCEE, α for risk-controlled, τ, q, budget); for
    risk-controlled PCEE ``served_threshold`` is the certified δ'. ``accuracy_lower_bound`` is
    1 - the (1 - η) upper bound on the error over the calibrate rows (None in ``point`` mode
    without a bound). ``test_*`` are a check only.
    """

    policy_name: str
    param_name: str | None
    value: float | None
    served_threshold: float | None
    mode: str
    target_accuracy: float | None
    flops_budget: float | None
    risk: float
    bound: str
    certified: bool
    n_fit: int
    n_calibrate: int
    calibrate_fraction: float
    seed: int
    calibrate_accuracy: float | None
    accuracy_lower_bound: float | None
    relative_cost: float | None
    mean_flops: float | None
    best_certifiable_accuracy: float | None
    test_accuracy: float | None = None
    test_relative_cost: float | None = None
    n_test: int | None = None
    #: the answer rule ρ chosen with the point on the same calibrate rows (``AnswerRule.to_dict()``; pcee.selective)
    answer_rule: dict[str, Any] | None = None
    #: what "cost" is: "flops" (cumulative FLOPs) or "latency" (a measured profile, pcee.latency);
    #: ``relative_cost`` and ``flops_budget`` are shares of the final exit's cost in that unit, and
    #: ``mean_flops`` is the mean cost per sample in it (FLOPs or seconds)
    cost: str = "flops"
    sweep: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)
    policy: Any = field(default=None, repr=False, compare=False)

    @property
    def guarantee(self) -> str:
        """One line: what the point promises, with η and the bound, or that it is an estimate."""
        if self.mode == "point":
            return f"point estimate (no guarantee): accuracy {_fmt(self.calibrate_accuracy)} on {self.n_calibrate} calibrate rows"
        if self.mode == "budget":
            return (
                f"cost <= budget {_fmt(self.flops_budget)} with probability >= {1 - self.risk:.2f} "
                f"({self.bound} bound, {self.n_calibrate} calibrate rows)"
            )
        if not self.certified:
            return (
                f"NOT certified: no point reaches accuracy >= {_fmt(self.target_accuracy)} at risk {self.risk} "
                f"(best certifiable {_fmt(self.best_certifiable_accuracy)} with {self.n_calibrate} calibrate rows)"
            )
        return (
            f"accuracy >= {_fmt(self.target_accuracy)} with probability >= {1 - self.risk:.2f} "
            f"({self.bound} bound on {self.n_calibrate} calibrate rows; lower bound {_fmt(self.accuracy_lower_bound)})"
        )

    def ensure_certified(self, consequence: str = "") -> None:
        """Raise :class:`NoCertifiablePointError` (naming the best certifiable accuracy and the number of
        calibrate rows) when a certified-mode point is not certified; ``consequence`` says what the caller did."""
        if self.mode != "certified" or self.certified:
            return
        best = float(self.best_certifiable_accuracy or 0.0)
        raise NoCertifiablePointError(
            f"no operating point of {self.policy_name!r} certifies accuracy >= {self.target_accuracy} at risk {self.risk}: the best "
            f"certifiable accuracy is {best:.4f} with {self.n_calibrate} calibrate rows ({self.bound} bound); "
            + (f"{consequence}. " if consequence else "")
            + "Lower the target, raise the risk or add validation data",
            best,
            self.n_calibrate,
        )

    def checked_on(self, test: ExitOutputs) -> OperatingPoint:
        """This point with its test accuracy and relative cost filled in: a check, computed after the choice."""
        num_exits = getattr(self.policy, "num_exits_", test.num_exits)
        if test.num_exits != num_exits:
            raise ValueError(f"test outputs have {test.num_exits} exits, the chosen policy serves {num_exits}")
        exits = self.policy.decide(test.logits)
        accuracy = float((test.logits[np.arange(len(test)), exits].argmax(-1) == test.labels).mean())
        cost = float((test.flops[exits] / test.flops[-1]).mean())
        return dataclasses.replace(self, test_accuracy=accuracy, test_relative_cost=cost, n_test=len(test))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON without the sweep rows and the policy object."""
        return {k: v for k, v in self.__dict__.items() if k not in ("sweep", "policy")}

    def tags(self) -> dict[str, str]:
        """The certificate as string tags (MLflow model versions, run tags)."""
        d = self.to_dict()
        rule = d.pop("answer_rule", None) or {}
        d.update(
            answer_threshold=rule.get("threshold"), answer_rule_kind=rule.get("kind"), coverage=rule.get("coverage")
        )
        return {f"op.{k}": ("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in d.items()}

    def markdown(self) -> str:
        """The certificate as a small markdown table (Prefect artifacts, demo, CLI)."""
        rows = [
            ("policy", f"`{self.policy_name}`"),
            ("mode", self.mode),
            ("target accuracy α", _fmt(self.target_accuracy)),
            ("risk η", f"{self.risk:g}"),
            ("bound", self.bound),
            (f"chosen {self.param_name}", _fmt(self.value)),
            ("served threshold", _fmt(self.served_threshold)),
            ("certified", "yes" if self.certified else "no"),
            ("calibrate rows (fit rows)", f"{self.n_calibrate} ({self.n_fit})"),
            ("accuracy on calibrate rows", _fmt(self.calibrate_accuracy)),
            ("accuracy lower bound", _fmt(self.accuracy_lower_bound)),
            (f"relative cost on calibrate rows ({self.cost})", _fmt(self.relative_cost)),
            (CHECK_LABEL, _fmt(self.test_accuracy) + (f" on {self.n_test} rows" if self.n_test else "")),
            ("test relative cost (check)", _fmt(self.test_relative_cost)),
        ]
        if self.answer_rule:
            rule = AnswerRule.from_dict(self.answer_rule)
            rows += [("answer threshold ρ", _fmt(rule.threshold)), ("answer rule", rule.guarantee)]
        return f"**{self.guarantee}**\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class SelfCertifyingPolicy(Protocol):
    """What a policy that certifies itself (``certifies_itself``) gives the pipeline once fitted on the
    validation outputs with the pipeline's split, α, η and bound: its own grid in testing order, the
    upper bounds on the error there, how many points passed, and its exits on that grid."""

    grid_: np.ndarray
    ucb_: np.ndarray
    n_pass_: int

    def fit(self, logits: np.ndarray, labels: np.ndarray, flops: np.ndarray | None = None) -> Any: ...

    def exits_on_own_grid(self, logits: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class _Sweep:
    """A policy's parameter grid in fixed-sequence order (most conservative first) and what the
    calibrate rows say at each value: (G,) arrays, ``hit`` and ``relative`` (G, N)."""

    param: str | None
    values: np.ndarray
    exits: np.ndarray
    hit: np.ndarray
    relative: np.ndarray
    lower: np.ndarray
    policy: Any
    n_pass: int | None = None  # a self-certifying policy's own count of passing points

    @property
    def accuracy(self) -> np.ndarray:
        return self.hit.mean(axis=1)

    @property
    def relative_cost(self) -> np.ndarray:
        return self.relative.mean(axis=1)

    @classmethod
    def on(
        cls, cal: ExitOutputs, exits: np.ndarray, lower: np.ndarray | None, risk: float, bound: str, **kw: Any
    ) -> _Sweep:
        correct = cal.logits.argmax(axis=-1) == cal.labels[:, None]  # (N, L)
        hit = correct[np.arange(len(cal))[None, :], exits]  # (G, N)
        if lower is None:
            lower = 1.0 - loss_upper_bound((~hit).astype(np.float64), risk, bound)
        return cls(exits=exits, hit=hit, relative=cal.flops[exits] / cal.flops[-1], lower=lower, **kw)

    def rows(self, passed: np.ndarray) -> list[dict[str, Any]]:
        """The sweep table of the result (one dict per value)."""
        accuracy, relative_cost = self.accuracy, self.relative_cost
        return [
            {
                "param_name": self.param,
                "value": float(self.values[i]),
                "calibrate_accuracy": float(accuracy[i]),
                "accuracy_lower_bound": float(self.lower[i]),
                "relative_cost": float(relative_cost[i]),
                "passed": bool(passed[i]),
            }
            for i in range(self.values.size)
        ]


def _check_request(
    mode: str, bound: str, target_accuracy: float | None, risk: float, cost: str, flops_budget: float | None
) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    check_bound(bound)
    check_target(target_accuracy, risk)
    if cost not in ("flops", "latency"):
        raise ValueError(f"unknown cost {cost!r}; valid: flops, latency")
    if mode in ("certified", "point") and target_accuracy is None:
        raise ValueError(f"mode {mode!r} needs target_accuracy")
    if mode == "budget" and (flops_budget is None or not (0.0 < float(flops_budget) <= 1.0)):
        raise ValueError(f"mode 'budget' needs flops_budget, a mean relative cost in (0, 1], got {flops_budget!r}")


def _self_certified_sweep(
    cls: type, policy_name: str, params: dict[str, Any], val: ExitOutputs, cal: ExitOutputs, common: dict[str, Any]
) -> _Sweep:
    """A policy that certifies itself is fitted on all of ``val`` with the pipeline's split, α, η and
    bound (it splits the same way), and its certificate is read from it."""

    if common["mode"] != "certified":
        raise ValueError(f"policy {policy_name!r} certifies itself; only mode 'certified' applies")
    own = {
        "alpha": float(common["target_accuracy"]),
        "eta": common["risk"],
        "bound": common["bound"],
        "calib_fraction": common["calibrate_fraction"],
        "seed": common["seed"],
    }
    policy = build_policy(policy_name, **{**params, **own})
    policy.fit(val.logits, val.labels, val.flops)
    if not isinstance(policy, SelfCertifyingPolicy):
        raise TypeError(
            f"policy {policy_name!r} says it certifies itself but lacks grid_/ucb_/n_pass_/exits_on_own_grid once fitted"
        )
    lower = 1.0 - np.asarray(policy.ucb_, dtype=np.float64)
    exits = policy.exits_on_own_grid(cal.logits)  # (G, N) at each δ' on the calibrate rows
    values = np.asarray(policy.grid_, dtype=np.float64)
    return _Sweep.on(
        cal,
        exits,
        lower,
        common["risk"],
        common["bound"],
        param="delta_prime",
        values=values,
        policy=policy,
        n_pass=int(policy.n_pass_),
    )


def _grid_sweep(
    cls: type,
    policy_name: str,
    params: dict[str, Any],
    fit: ExitOutputs,
    cal: ExitOutputs,
    grid: np.ndarray | None,
    common: dict[str, Any],
) -> _Sweep:
    """Every value of the policy's parameter, fitted on the fit rows, tested on the calibrate rows."""
    values = np.asarray(cls.default_grid() if grid is None else grid, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("the parameter grid is empty")
    if cls.param_name in params:
        raise ValueError(
            f"{cls.param_name!r} is the parameter pcee chooses for {policy_name!r}; do not fix it in params"
        )
    values = np.sort(values)[::-1] if cls.conservative_high else np.sort(values)  # most conservative first
    policy, exits = exits_on_grid(policy_name, params, fit, cal, values)
    return _Sweep.on(
        cal, exits, None, common["risk"], common["bound"], param=cls.param_name, values=values, policy=policy
    )


def _cheapest(sweep: _Sweep, ok: np.ndarray) -> int | None:
    """The cheapest point among ``ok`` on the calibrate rows (ties: the smaller value)."""
    return int(np.flatnonzero(ok)[np.lexsort((sweep.values[ok], sweep.relative_cost[ok]))[0]]) if ok.any() else None


def _choose_certified(sweep: _Sweep, target_accuracy: float, **_: Any) -> tuple[np.ndarray, int | None]:
    """Fixed-sequence testing: every point before the first failure passes; the cheapest is served.
    A self-certifying policy's own count decides, and its last passing point is served."""
    if sweep.n_pass is not None:
        passed = np.arange(sweep.values.size) < sweep.n_pass
        return passed, (sweep.n_pass - 1 if sweep.n_pass > 0 else None)
    passed = np.arange(sweep.values.size) < fixed_sequence_passes(sweep.lower, target_accuracy)
    return passed, _cheapest(sweep, passed)


def _choose_point(sweep: _Sweep, target_accuracy: float, **_: Any) -> tuple[np.ndarray, int | None]:
    """The cheapest point whose calibrate accuracy reaches α: an estimate, no guarantee."""
    ok = sweep.accuracy >= float(target_accuracy) - 1e-12
    return ok, _cheapest(sweep, ok)


def _choose_budget(
    sweep: _Sweep, flops_budget: float, risk: float, bound: str, **_: Any
) -> tuple[np.ndarray, int | None]:
    """The most accurate point whose cost upper bound is within the budget, tested cheapest first
    (where a cost bound is most likely to hold)."""
    order = np.argsort(sweep.relative_cost, kind="stable")
    cost_ucb = loss_upper_bound(
        sweep.relative[order], risk, bound if bound != "clopper-pearson" else "hoeffding-bentkus"
    )
    ok_sorted = cost_ucb <= float(flops_budget) + 1e-12
    n_ok = int(np.argmin(ok_sorted)) if not ok_sorted.all() else ok_sorted.size
    passed = np.zeros(sweep.values.size, dtype=bool)
    passed[order[:n_ok]] = True
    if not n_ok:
        return passed, None
    return passed, int(np.flatnonzero(passed)[np.lexsort((sweep.relative_cost[passed], -sweep.accuracy[passed]))[0]])


_CHOOSERS = {"certified": _choose_certified, "point": _choose_point, "budget": _choose_budget}


def _served_policy(
    cls: type, policy_name: str, params: dict[str, Any], sweep: _Sweep, serve: int, fit: ExitOutputs
) -> Any:
    """The policy to serve at ``values[serve]``, fitted on the fit rows (a self-certifying one is already)."""

    if cls.certifies_itself:
        return sweep.policy
    policy = build_policy(policy_name, **{**params, cls.param_name: float(sweep.values[serve])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        policy.fit(fit.logits, fit.labels, fit.flops)
    return policy


def choose_operating_point(
    policy_name: str,
    val: ExitOutputs,
    *,
    target_accuracy: float | None = None,
    flops_budget: float | None = None,
    risk: float = DEFAULT_RISK,
    bound: str = DEFAULT_BOUND,
    mode: str = "certified",
    calibrate_fraction: float = DEFAULT_CALIBRATE_FRACTION,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    grid: np.ndarray | None = None,
    test: ExitOutputs | None = None,
    require_certified: bool = False,
    cost: str = "flops",
) -> OperatingPoint:
    """Sweep, choose, fit and certify ``policy_name`` on the validation outputs alone.

    Parameters
    ----------
    policy_name : any registered policy except the oracle (it needs labels to decide)
    val : validation outputs; split into fit / calibrate parts (``calibrate_fraction``, ``seed``)
    target_accuracy : α in (0, 1) (modes certified and point)
    flops_budget : mean relative cost in (0, 1] (mode budget)
    risk : η in (0, 1)
    bound : "clopper-pearson", "hoeffding-bentkus" or "wsr"
    mode : "certified", "point" or "budget"
    params : the policy's other parameters (score, n_bins, ...)
    grid : values of its parameter (default: the policy's ``default_grid()``)
    test : test outputs, evaluated *after* the choice and reported as a check only
    require_certified : raise :class:`NoCertifiablePointError` instead of returning an uncertified point
    cost : what ``val.flops`` (and ``test.flops``) hold: "flops", or "latency" when the caller swapped
        in a measured profile (``ExitOutputs.with_cost``, :func:`pcee.latency.cost_vector`); recorded

    Returns
    -------
    OperatingPoint, with ``policy`` the fitted policy to serve. An uncertified result serves the
    most conservative point (everyone as late as the policy allows).
    """

    _check_request(mode, bound, target_accuracy, risk, cost, flops_budget)
    cls = get_policy_class(policy_name)
    if cls.decides_with_labels:
        raise ValueError(f"policy {policy_name!r} decides with labels; it has no operating point to serve")
    if test is not None and (test.num_exits != val.num_exits or test.num_classes != val.num_classes):
        raise ValueError("test outputs disagree with the validation outputs in exits or classes")
    params = dict(params or {})
    fit_idx, cal_idx = split_fit_calibrate(val.labels, calibrate_fraction, seed)
    fit, cal = val.subset(fit_idx), val.subset(cal_idx)
    common: dict[str, Any] = dict(
        policy_name=policy_name,
        param_name=cls.param_name,
        mode=mode,
        target_accuracy=target_accuracy,
        flops_budget=flops_budget,
        risk=float(risk),
        bound=bound,
        n_fit=len(fit),
        n_calibrate=len(cal),
        calibrate_fraction=float(calibrate_fraction),
        seed=int(seed),
        cost=cost,
    )
    if cls.certifies_itself:
        sweep = _self_certified_sweep(cls, policy_name, params, val, cal, common)
    else:
        sweep = _grid_sweep(cls, policy_name, params, fit, cal, grid, common)
    passed, chosen = _CHOOSERS[mode](
        sweep, target_accuracy=target_accuracy, flops_budget=flops_budget, risk=float(risk), bound=bound
    )
    # an uncertified result serves the most conservative point (budget: the cheapest)
    serve = chosen if chosen is not None else (0 if mode != "budget" else int(np.argmin(sweep.relative_cost)))
    policy = _served_policy(cls, policy_name, params, sweep, serve, fit)
    result = _result(common, sweep, passed, chosen, serve, policy, cal)
    if require_certified:
        result.ensure_certified()
    return result if test is None else result.checked_on(test)  # the check comes after every choice


def _result(
    common: dict[str, Any],
    sweep: _Sweep,
    passed: np.ndarray,
    chosen: int | None,
    serve: int,
    policy: Any,
    cal: ExitOutputs,
) -> OperatingPoint:
    """The operating point served at ``serve``, with its answer rule ρ chosen on the same calibrate rows."""

    mode, certified = common["mode"], chosen is not None
    value = float(common["target_accuracy"]) if sweep.n_pass is not None else float(sweep.values[serve])
    lower = float(sweep.lower[serve])
    rule = rule_for_point(
        policy,
        cal.logits,
        cal.labels,
        mode=mode,
        certified=certified,
        target_accuracy=common["target_accuracy"],
        risk=common["risk"],
        bound=common["bound"],
        accuracy_lower_bound=lower,
    )
    relative_cost = float(sweep.relative_cost[serve])
    return OperatingPoint(
        **common,
        value=value,
        served_threshold=float(policy.served_threshold()),
        certified=certified if mode != "point" else False,
        calibrate_accuracy=float(sweep.accuracy[serve]),
        accuracy_lower_bound=lower,
        relative_cost=relative_cost,
        mean_flops=float(relative_cost * cal.flops[-1]),
        # the best accuracy a fixed sequence can certify is limited by its first (most conservative) point
        best_certifiable_accuracy=float(sweep.lower[0]) if sweep.lower.size else None,
        sweep=sweep.rows(passed),
        policy=policy,
        answer_rule=rule.to_dict(),
    )


__all__ = [
    "BOUNDS",
    "CHECK_LABEL",
    "DEFAULT_BOUND",
    "DEFAULT_CALIBRATE_FRACTION",
    "DEFAULT_RISK",
    "MODES",
    "NoCertifiablePointError",
    "OperatingPoint",
    "SMALL_CALIBRATION",
    "SelfCertifyingPolicy",
    "best_possible_accuracy",
    "calibrate_size",
    "check_calibration_size",
    "check_target",
    "choose_operating_point",
    "closed_form_exits",
    "exits_from_running_max",
    "running_max",
    "fixed_sequence_passes",
    "exits_on_grid",
    "split_fit_calibrate",
]

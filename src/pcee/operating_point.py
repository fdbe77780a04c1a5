"""The operating-point pipeline: sweep -> choose -> fit -> certificate, in one function.

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
from typing import Any

import numpy as np

from pcee.calibration.bounds import BOUNDS, check_bound, loss_upper_bound
from pcee.data.splits import stratified_take
from pcee.outputs import ExitOutputs

MODES = ("certified", "point", "budget")
#: default risk η: P(accuracy < α) <= η over calibration draws
DEFAULT_RISK = 0.1
#: default bound; chosen by benchmarks/target_guarantee.py (tightest with miss rate <= η)
DEFAULT_BOUND = "clopper-pearson"
#: default share of the validation outputs held out to calibrate (choose and bound)
DEFAULT_CALIBRATE_FRACTION = 0.5
#: below this many calibrate rows the bound costs several points of accuracy: warn
SMALL_CALIBRATION = 500
#: the check column's label wherever test accuracy is shown next to a choice
CHECK_LABEL = "test accuracy (check, not used for choosing)"


class NoCertifiablePointError(ValueError):
    """No operating point certifies the target at this risk; names the best certifiable accuracy."""

    def __init__(self, message: str, best_certifiable_accuracy: float, n_calibrate: int) -> None:
        super().__init__(message)
        self.best_certifiable_accuracy = best_certifiable_accuracy
        self.n_calibrate = n_calibrate


# ---------------------------------------------------------------------------------------------
# data roles
# ---------------------------------------------------------------------------------------------
def check_target(target_accuracy: float | None, risk: float) -> None:
    """ValueError unless α and η are numbers in (0, 1)."""
    for name, value in (("target_accuracy", target_accuracy), ("risk", risk)):
        if value is None and name == "target_accuracy":
            continue
        try:
            v = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from None
        if not (math.isfinite(v) and 0.0 < v < 1.0):
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def calibrate_size(n_val: int, calibrate_fraction: float = DEFAULT_CALIBRATE_FRACTION) -> int:
    """Number of calibrate rows the split gives for ``n_val`` validation rows."""
    if not 0.0 < float(calibrate_fraction) < 1.0:
        raise ValueError(f"calibrate_fraction must be in (0, 1), got {calibrate_fraction!r}")
    return int(round(float(calibrate_fraction) * int(n_val)))


def best_possible_accuracy(n_calibrate: int, risk: float, bound: str = DEFAULT_BOUND) -> float:
    """The highest α any point can certify with ``n_calibrate`` rows: zero errors, bound at η."""
    if n_calibrate <= 0:
        return 0.0
    return float(1.0 - loss_upper_bound(np.zeros(n_calibrate), risk, bound)[0])


def check_calibration_size(
    n_val: int,
    target_accuracy: float | None,
    risk: float = DEFAULT_RISK,
    bound: str = DEFAULT_BOUND,
    calibrate_fraction: float = DEFAULT_CALIBRATE_FRACTION,
    mode: str = "certified",
) -> int:
    """Fail early (before training) when the calibrate part is too small for any certificate.

    Returns the calibrate size; warns when it is small enough that the bound costs noticeably.
    """
    check_target(target_accuracy, risk)
    check_bound(bound)
    n_cal = calibrate_size(n_val, calibrate_fraction)
    if n_cal < 1 or n_val - n_cal < 1:
        raise ValueError(
            f"calibrate_fraction={calibrate_fraction} leaves an empty fit or calibrate part of {n_val} validation rows"
        )
    if mode == "certified" and target_accuracy is not None:
        best = best_possible_accuracy(n_cal, risk, bound)
        if best < float(target_accuracy):
            raise ValueError(
                f"{n_cal} calibrate rows cannot certify accuracy {target_accuracy} at risk {risk} with the {bound} bound even "
                f"with zero errors (best possible {best:.4f}); use more validation data, a lower target or a higher risk"
            )
    if n_cal < SMALL_CALIBRATION:
        warnings.warn(
            f"only {n_cal} calibrate rows: the {bound} bound at risk {risk} alone costs about "
            f"{1.0 - best_possible_accuracy(n_cal, risk, bound):.3f} accuracy even with zero errors; the certified point "
            f"will be more conservative than a point estimate",
            UserWarning,
            stacklevel=2,
        )
    return n_cal


def split_fit_calibrate(
    n_or_labels: np.ndarray, calibrate_fraction: float = DEFAULT_CALIBRATE_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, calibrate) row indices of the validation outputs: seeded, stratified, disjoint.

    ``fit`` is sorted; ``calibrate`` is in a seeded random order (the WSR bound reads its losses as
    a sequence, which must not follow any order the rows came in).
    """
    labels = np.asarray(n_or_labels)
    n = labels.shape[0]
    n_cal = calibrate_size(n, calibrate_fraction)
    if n_cal < 1 or n - n_cal < 1:
        raise ValueError(
            f"calibrate_fraction={calibrate_fraction} leaves an empty fit or calibrate part of {n} validation rows"
        )
    rng = np.random.default_rng(int(seed))
    cal, fit = stratified_take(labels, np.arange(n, dtype=np.int64), n_cal, rng)
    return fit, cal[rng.permutation(cal.size)]


# ---------------------------------------------------------------------------------------------
# exits on a grid, the fixed sequence
# ---------------------------------------------------------------------------------------------
def running_max(map_values: np.ndarray) -> np.ndarray:
    """R (N, L-1): the running maximum of each sample's map values over the non-final exits, NaN
    read as -inf (a NaN map value never passes). PCEE(δ) leaves at the first l with R_l >= δ: at
    exit l exactly for R_{l-1} < δ <= R_l (R_{-1} = -inf, R_{L-1} = +inf). Every closed form of the
    PCEE rule (:func:`closed_form_exits`, :func:`pcee.sweep.exit_counts_closed_form`) starts here."""
    mv = np.asarray(map_values, dtype=np.float64)
    return np.maximum.accumulate(np.where(np.isnan(mv), -np.inf, mv), axis=1) if mv.shape[1] else mv


def exits_from_running_max(running: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Exits (G, N) of the PCEE rule at every threshold in ``values`` from :func:`running_max`
    (N, L-1): the number of R_l below δ."""
    return (
        (running[None, :, :] < np.asarray(values, dtype=np.float64).ravel()[:, None, None]).sum(axis=2).astype(np.int64)
    )


def closed_form_exits(map_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Exits (G, N) of the PCEE rule at every threshold in ``values`` from map values (N, L-1).

    With R the running maximum of a sample's map values (NaN never passes), the sample leaves at
    the first l with R_l >= δ, i.e. at the number of R_l below δ.
    """
    return exits_from_running_max(running_max(map_values), values)


def fixed_sequence_passes(lower_bounds: np.ndarray, target_accuracy: float) -> int:
    """How many points, in testing order, pass (lower bound >= α) before the first failure."""
    passes = np.asarray(lower_bounds) >= float(target_accuracy) - 1e-12
    return int(np.argmin(passes)) if not passes.all() else int(passes.size)


def exits_on_grid(
    policy_name: str, params: dict[str, Any], fit: ExitOutputs, evaluate: ExitOutputs, values: np.ndarray
) -> tuple[Any, np.ndarray]:
    """(policy fitted on ``fit``, exits (G, N) on ``evaluate`` for every value of its parameter).

    Closed-form policies use their map values: with R the running maximum over non-final exits, a
    sample leaves at the number of R_l below δ. Others set the value and refit where it matters.
    """
    from pcee.policies.pcee import PCEEPolicy
    from pcee.policies.registry import build_policy, get_policy_class

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
            from pcee.selective import AnswerRule

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
    from pcee.policies.registry import build_policy, get_policy_class
    from pcee.policies.risk_controlled import RiskControlledPCEEPolicy

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    check_bound(bound)
    check_target(target_accuracy, risk)
    if cost not in ("flops", "latency"):
        raise ValueError(f"unknown cost {cost!r}; valid: flops, latency")
    if mode in ("certified", "point") and target_accuracy is None:
        raise ValueError(f"mode {mode!r} needs target_accuracy")
    if mode == "budget":
        if flops_budget is None or not (0.0 < float(flops_budget) <= 1.0):
            raise ValueError(f"mode 'budget' needs flops_budget, a mean relative cost in (0, 1], got {flops_budget!r}")
    cls = get_policy_class(policy_name)
    if cls.decides_with_labels:
        raise ValueError(f"policy {policy_name!r} decides with labels; it has no operating point to serve")
    params = dict(params or {})
    fit_idx, cal_idx = split_fit_calibrate(val.labels, calibrate_fraction, seed)
    fit, cal = val.subset(fit_idx), val.subset(cal_idx)
    n_cal = len(cal)
    common: dict[str, Any] = dict(
        policy_name=policy_name,
        param_name=cls.param_name,
        mode=mode,
        target_accuracy=target_accuracy,
        flops_budget=flops_budget,
        risk=float(risk),
        bound=bound,
        n_fit=len(fit),
        n_calibrate=n_cal,
        calibrate_fraction=float(calibrate_fraction),
        seed=int(seed),
        cost=cost,
    )

    if cls.certifies_itself:
        if mode != "certified":
            raise ValueError(f"policy {policy_name!r} certifies itself; only mode 'certified' applies")
        policy = build_policy(
            policy_name,
            **{
                **params,
                "alpha": float(target_accuracy),  # type: ignore[arg-type] - certified mode: checked above
                "eta": float(risk),
                "bound": bound,
                "calib_fraction": float(calibrate_fraction),
                "seed": int(seed),
            },
        )
        if not isinstance(policy, RiskControlledPCEEPolicy):
            raise TypeError(f"policy {policy_name!r} certifies itself but is not a risk-controlled PCEE policy")
        policy.fit(val.logits, val.labels, val.flops)
        values = np.asarray(policy.grid_, dtype=np.float64)
        exits = policy.exits_on_own_grid(cal.logits)  # (G, N) at each δ' on the calibrate rows
        lower = 1.0 - np.asarray(policy.ucb_, dtype=np.float64)
        n_pass = policy.n_pass_
        passed = np.arange(values.size) < n_pass
        chosen = n_pass - 1 if n_pass > 0 else None
        sweep_param = "delta_prime"
    else:
        values = np.asarray(cls.default_grid() if grid is None else grid, dtype=np.float64).ravel()
        if values.size == 0:
            raise ValueError("the parameter grid is empty")
        if cls.param_name in params:
            raise ValueError(
                f"{cls.param_name!r} is the parameter pcee chooses for {policy_name!r}; do not fix it in params"
            )
        # the fixed sequence: most conservative value first
        values = np.sort(values)[::-1] if cls.conservative_high else np.sort(values)
        policy, exits = exits_on_grid(policy_name, params, fit, cal, values)
        sweep_param = cls.param_name
    correct = cal.logits.argmax(axis=-1) == cal.labels[:, None]  # (N, L)
    rows = np.arange(n_cal)
    hit = correct[rows[None, :], exits]  # (G, N)
    accuracy = hit.mean(axis=1)
    rel = cal.flops[exits] / cal.flops[-1]  # (G, N) per-sample relative cost
    relative_cost = rel.mean(axis=1)
    if not cls.certifies_itself:
        lower = 1.0 - loss_upper_bound((~hit).astype(np.float64), risk, bound)

    if not cls.certifies_itself and mode == "certified":
        n_pass = fixed_sequence_passes(lower, float(target_accuracy))  # type: ignore[arg-type]
        passed = np.arange(values.size) < n_pass
        chosen = int(np.flatnonzero(passed)[np.lexsort((values[passed], relative_cost[passed]))[0]]) if n_pass else None
    elif mode == "point":
        ok = accuracy >= float(target_accuracy) - 1e-12  # type: ignore[arg-type]
        passed = ok
        chosen = int(np.flatnonzero(ok)[np.lexsort((values[ok], relative_cost[ok]))[0]]) if ok.any() else None
    elif mode == "budget":
        # cheapest first: a cost bound is tested where it is most likely to hold
        order = np.argsort(relative_cost, kind="stable")
        cost_ucb = loss_upper_bound(rel[order], risk, bound if bound != "clopper-pearson" else "hoeffding-bentkus")
        ok_sorted = cost_ucb <= float(flops_budget) + 1e-12  # type: ignore[arg-type]
        n_ok = int(np.argmin(ok_sorted)) if not ok_sorted.all() else ok_sorted.size
        passed = np.zeros(values.size, dtype=bool)
        passed[order[:n_ok]] = True
        chosen = (
            int(np.flatnonzero(passed)[np.lexsort((relative_cost[passed], -accuracy[passed]))[0]]) if n_ok else None
        )

    # the best accuracy a fixed sequence can certify is limited by its first (most conservative) point
    best = float(lower[0]) if lower.size else None
    certified = chosen is not None
    serve = chosen if chosen is not None else (0 if mode != "budget" else int(np.argmin(relative_cost)))
    if not cls.certifies_itself:
        policy = build_policy(policy_name, **{**params, cls.param_name: float(values[serve])})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            policy.fit(fit.logits, fit.labels, fit.flops)
        value = float(values[serve])
    else:
        value = float(target_accuracy)  # type: ignore[arg-type]
    sweep_rows = [
        {
            "param_name": sweep_param,
            "value": float(values[i]),
            "calibrate_accuracy": float(accuracy[i]),
            "accuracy_lower_bound": float(lower[i]),
            "relative_cost": float(relative_cost[i]),
            "passed": bool(passed[i]),
        }
        for i in range(values.size)
    ]
    if test is not None and (test.num_exits != val.num_exits or test.num_classes != val.num_classes):
        raise ValueError("test outputs disagree with the validation outputs in exits or classes")
    result = OperatingPoint(
        **common,
        value=value,
        served_threshold=float(policy.served_threshold()),
        certified=bool(certified) if mode != "point" else False,
        calibrate_accuracy=float(accuracy[serve]),
        accuracy_lower_bound=float(lower[serve]),
        relative_cost=float(relative_cost[serve]),
        mean_flops=float(relative_cost[serve] * cal.flops[-1]),
        best_certifiable_accuracy=best,
        sweep=sweep_rows,
        policy=policy,
    )
    from pcee.selective import rule_for_point

    rule = rule_for_point(
        policy,
        cal.logits,
        cal.labels,
        mode=mode,
        certified=bool(certified),
        target_accuracy=target_accuracy,
        risk=float(risk),
        bound=bound,
        accuracy_lower_bound=float(lower[serve]),
    )
    result = dataclasses.replace(result, answer_rule=rule.to_dict())
    if require_certified:
        result.ensure_certified()
    return result if test is None else result.checked_on(test)  # the check comes after every choice


__all__ = [
    "BOUNDS",
    "CHECK_LABEL",
    "DEFAULT_BOUND",
    "DEFAULT_CALIBRATE_FRACTION",
    "DEFAULT_RISK",
    "MODES",
    "NoCertifiablePointError",
    "OperatingPoint",
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

"""The δ sweep: accuracy, mean FLOPs, relative cost, control shortfall and exit histogram of a
policy over a grid of its parameter (docs/architecture.md).

PCEE-type policies are swept in closed form. For one sample, PCEE(δ) leaves at the first exit l
whose map value m_l reaches δ. With R_l = max(m_0..m_l) the running maximum, the sample leaves at
exit l exactly for R_{l-1} < δ <= R_l (R_{-1} = -inf, R_{L-1} = +inf): a step function of δ
whose steps are the new running maxima. So every (sample, exit) pair contributes its correctness
and its cost on one interval of the δ grid; one ``searchsorted`` of the interval ends into the
sorted grid, a difference array (``bincount``) and a cumulative sum give accuracy, cost and the
exit histogram for every δ at once, in O(N L log D + D L).

Other policies are swept by a refit/decide loop over their own parameter (τ, q, budget).

The oracle's curve: for an accuracy target δ, the cheapest assignment of exits (labels known)
whose accuracy is >= δ -- "the oracle with a cost cap". Every sample starts at exit 1; the
samples exit 1 gets wrong but a later exit gets right are moved to their first correct exit, the
cheapest moves first, until the target is met (see :func:`pcee.policies.oracle.oracle_frontier`).
Samples no exit gets right stay at exit 1 (they cost least there), so the curve's last point has
the oracle policy's accuracy at a cost <= the oracle policy's (which sends them to exit L).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pcee.atomic import atomic_file
from pcee.calibration.ltt import running_max
from pcee.outputs import ExitOutputs
from pcee.policies.pcee import PCEEPolicy
from pcee.policies.registry import build_policy, get_policy_class

ROW_COLUMNS = ("policy", "param_name", "delta", "accuracy", "mean_flops", "relative_cost", "shortfall", "achievable")


def is_accuracy_target(policy: str) -> bool:
    """Whether the policy's swept parameter is read as an accuracy target (a shortfall is defined).

    Each policy says so (``param_is_accuracy_target``). threshold/temperature's τ is a confidence
    level, not a target; reading it as one is the naive control rule PCEE improves on, so their
    shortfall is reported for comparison.
    """

    return bool(get_policy_class(policy).param_is_accuracy_target)


def default_delta_grid(step: float = 0.005) -> np.ndarray:
    """δ = 0, step, ..., 1 (rounded so that grid values print and compare cleanly)."""
    n = int(round(1.0 / step))
    return np.round(np.arange(n + 1) * step, 10)


@dataclass
class SweepResult:
    """One policy's sweep on a set of outputs.

    Attributes
    ----------
    policy : policy name
    param_name : name of the swept parameter (delta, alpha, tau, q, budget); written in the
        ``delta`` column of sweep.csv whatever its name
    delta : (D,) swept parameter values
    accuracy : (D,) accuracy of the answers
    mean_flops : (D,) mean cumulative FLOPs per sample
    relative_cost : (D,) mean_flops / F_L
    shortfall : (D,) max(0, δ - accuracy) for policies whose parameter is an accuracy target
        (pcee, pcee-ws, risk-controlled (α), oracle) and for threshold/temperature with τ read
        as one (the naive rule "confidence >= τ gives accuracy >= τ"); NaN for msdnet-budget
        and EERO (q and budgets are not accuracy targets: falling short of them means nothing)
    exit_hist : (D, L) fraction of samples answered at each exit
    final_accuracy : accuracy of the final exit alone; δ <= final_accuracy are "achievable"
    flops : (L,) cumulative F_l
    """

    policy: str
    param_name: str
    delta: np.ndarray
    accuracy: np.ndarray
    mean_flops: np.ndarray
    relative_cost: np.ndarray
    shortfall: np.ndarray
    exit_hist: np.ndarray
    final_accuracy: float
    flops: np.ndarray = field(repr=False)

    @property
    def num_exits(self) -> int:
        return self.exit_hist.shape[1]

    @property
    def achievable(self) -> np.ndarray:
        """(D,) bool: the parameter is an accuracy target no higher than the final exit's accuracy."""
        if not is_accuracy_target(self.policy):
            return np.zeros(self.delta.shape, dtype=bool)
        return self.delta <= self.final_accuracy + 1e-12

    def __len__(self) -> int:
        return int(self.delta.size)

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per parameter value: the contract columns plus ``exit_1..exit_L`` fractions."""
        rows = []
        achievable = self.achievable
        for i in range(len(self)):
            row: dict[str, Any] = {
                "policy": self.policy,
                "param_name": self.param_name,
                "delta": float(self.delta[i]),
                "accuracy": float(self.accuracy[i]),
                "mean_flops": float(self.mean_flops[i]),
                "relative_cost": float(self.relative_cost[i]),
                "shortfall": float(self.shortfall[i]),
                "achievable": bool(achievable[i]),
            }
            for level in range(self.num_exits):
                row[f"exit_{level + 1}"] = float(self.exit_hist[i, level])
            rows.append(row)
        return rows

    @classmethod
    def from_rows(
        cls, rows: list[dict[str, Any]], flops: np.ndarray, final_accuracy: float, policy: str | None = None
    ) -> SweepResult:
        """The inverse of :meth:`to_rows` for one policy's rows; ``flops`` (L,) and
        ``final_accuracy`` are not in the rows. Missing ``exit_l`` columns read as NaN."""
        if not rows:
            raise ValueError("no sweep rows")
        flops = np.asarray(flops, dtype=np.float64)

        def column(key: str) -> np.ndarray:
            return np.array([float(r[key]) for r in rows], dtype=np.float64)

        hist = np.array(
            [[float(r.get(f"exit_{level + 1}", np.nan)) for level in range(flops.size)] for r in rows], dtype=np.float64
        )
        return cls(
            policy=policy or rows[0]["policy"],
            param_name=rows[0].get("param_name", "delta"),
            delta=column("delta"),
            accuracy=column("accuracy"),
            mean_flops=column("mean_flops"),
            relative_cost=column("relative_cost"),
            shortfall=column("shortfall"),
            exit_hist=hist,
            final_accuracy=float(final_accuracy),
            flops=flops,
        )

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_rows` as CSV (atomically)."""
        return write_rows_csv(path, self.to_rows())


def write_rows_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Rows of one or more sweeps as CSV; columns are the union (exit columns of the widest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(ROW_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return v


# ---------------------------------------------------------------------------------------------
# closed form
# ---------------------------------------------------------------------------------------------
def _check_arrays(correct: np.ndarray, flops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2 or correct.shape[0] == 0 or correct.shape[1] == 0:
        raise ValueError(f"correct must be a non-empty (N, L) array, got shape {correct.shape}")
    flops = np.asarray(flops, dtype=np.float64)
    if flops.shape != (correct.shape[1],):
        raise ValueError(f"flops must be ({correct.shape[1]},), got shape {flops.shape}")
    if not np.all(np.isfinite(flops)) or np.any(flops <= 0):
        raise ValueError("flops must be positive and finite (cumulative cost F_l)")
    return correct, flops


def exit_counts_closed_form(
    map_values: np.ndarray, correct: np.ndarray, deltas: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(hits (D,), counts (D, L)): correct answers and samples per exit of PCEE(δ) for each δ.

    ``exit_mask(l) = map_values[:, l] >= δ``; NaN map values never pass. ``deltas`` need not be
    sorted and may hold ±inf.
    """
    correct = np.asarray(correct, dtype=bool)
    n, num_exits = correct.shape
    mv = np.asarray(map_values, dtype=np.float64)
    if mv.shape != (n, num_exits - 1):
        raise ValueError(
            f"map_values must be ({n}, {num_exits - 1}) for correct of shape {correct.shape}, got {mv.shape}"
        )
    deltas = np.asarray(deltas, dtype=np.float64).ravel()
    if np.any(np.isnan(deltas)):
        raise ValueError("deltas contain NaN")
    d = deltas.size
    running = running_max(mv)  # (N, L-1)
    lower = np.concatenate([np.full((n, 1), -np.inf), running], axis=1)  # (N, L): leaves at l for lower < δ ...
    upper = np.concatenate([running, np.full((n, 1), np.inf)], axis=1)  # ... <= upper
    order = np.argsort(deltas, kind="stable")
    # δ = -inf lets every non-NaN map value pass; the most negative float does the same while
    # staying above the -inf that stands for NaN (which never passes)
    g = np.maximum(deltas[order], np.finfo(np.float64).min)
    start = np.searchsorted(g, lower, side="right")  # first sorted index with δ > lower
    stop = np.searchsorted(g, upper, side="right")  # first sorted index with δ > upper
    stop[:, -1] = d  # the final exit holds every δ above its lower end, even δ = +inf
    level = np.broadcast_to(np.arange(num_exits), (n, num_exits))
    size = (d + 1) * num_exits
    diff_counts = np.bincount((start * num_exits + level).ravel(), minlength=size) - np.bincount(
        (stop * num_exits + level).ravel(), minlength=size
    )
    counts_sorted = np.cumsum(diff_counts.reshape(d + 1, num_exits), axis=0)[:d]  # (D, L)
    c = correct.ravel().astype(np.int64)
    diff_hits = np.bincount(start.ravel(), weights=c, minlength=d + 1) - np.bincount(
        stop.ravel(), weights=c, minlength=d + 1
    )
    hits_sorted = np.rint(np.cumsum(diff_hits)[:d]).astype(np.int64)
    hits = np.empty(d, dtype=np.int64)
    counts = np.empty((d, num_exits), dtype=np.int64)
    hits[order] = hits_sorted
    counts[order] = counts_sorted
    return hits, counts


def sweep_delta_closed_form(
    map_values: np.ndarray,
    correct: np.ndarray,
    flops: np.ndarray,
    deltas: np.ndarray | None = None,
    policy: str = "pcee",
    param_name: str = "delta",
    targets: np.ndarray | None = None,
) -> SweepResult:
    """Sweep PCEE(δ) on every δ at once (no loop over δ).

    Parameters
    ----------
    map_values : (N, L-1) map value of each non-final exit (``policy.map_values(logits)``)
    correct : (N, L) bool, exit l's prediction is right
    flops : (L,) cumulative F_l
    deltas : (D,) thresholds (default 0..1 step 0.005); reported in ``delta``
    policy, param_name : labels for the result
    targets : (D,) accuracy targets for the shortfall (default ``deltas``); risk-controlled PCEE
        passes its α here while ``deltas`` holds the certified δ' it applies

    Returns
    -------
    SweepResult
    """
    correct, flops = _check_arrays(correct, flops)
    deltas = default_delta_grid() if deltas is None else np.asarray(deltas, dtype=np.float64).ravel()
    hits, counts = exit_counts_closed_form(map_values, correct, deltas)
    return _result(
        policy,
        param_name,
        deltas if targets is None else np.asarray(targets, dtype=np.float64),
        hits,
        counts,
        correct,
        flops,
    )


def _result(
    policy: str,
    param_name: str,
    values: np.ndarray,
    hits: np.ndarray,
    counts: np.ndarray,
    correct: np.ndarray,
    flops: np.ndarray,
) -> SweepResult:
    n = correct.shape[0]
    accuracy = hits / n
    mean_flops = counts @ flops / n
    if is_accuracy_target(policy):
        shortfall = np.maximum(0.0, values - accuracy)
    else:
        shortfall = np.full(values.shape, np.nan)
    return SweepResult(
        policy=policy,
        param_name=param_name,
        delta=np.asarray(values, dtype=np.float64),
        accuracy=accuracy,
        mean_flops=mean_flops,
        relative_cost=mean_flops / flops[-1],
        shortfall=shortfall,
        exit_hist=counts / n,
        final_accuracy=float(correct[:, -1].mean()),
        flops=flops,
    )


def sweep_exits(
    policy: str, param_name: str, values: np.ndarray, exits: np.ndarray, correct: np.ndarray, flops: np.ndarray
) -> SweepResult:
    """A sweep from explicit exits (D, N) per parameter value (the loop path)."""
    correct, flops = _check_arrays(correct, flops)
    exits = np.asarray(exits, dtype=np.int64)
    n, num_exits = correct.shape
    hits = correct[np.arange(n)[None, :], exits].sum(axis=1)
    counts = (
        np.stack([np.bincount(e, minlength=num_exits) for e in exits])
        if len(exits)
        else np.zeros((0, num_exits), np.int64)
    )
    return _result(policy, param_name, np.asarray(values, dtype=np.float64), hits, counts, correct, flops)


def oracle_curve(correct: np.ndarray, flops: np.ndarray, targets: np.ndarray | None = None) -> SweepResult:
    """The oracle with a cost cap: for each accuracy target, the cheapest exits reaching it.

    Targets above the oracle's accuracy get the full oracle (the best reachable).
    """
    correct, flops = _check_arrays(correct, flops)
    targets = default_delta_grid() if targets is None else np.asarray(targets, dtype=np.float64).ravel()
    n, num_exits = correct.shape
    base = int(correct[:, 0].sum())
    fixable = correct.any(axis=1) & ~correct[:, 0]
    first = np.argmax(correct[fixable], axis=1)  # first correct exit of each fixable sample
    first = first[np.argsort(flops[first], kind="stable")]  # cheapest moves first
    moved = np.zeros((first.size + 1, num_exits), dtype=np.int64)  # moved[k, l]: of the k cheapest, how many go to l
    np.add.at(moved, (np.arange(1, first.size + 1), first), 1)
    moved = np.cumsum(moved, axis=0)
    # smallest k with (base + k) / n >= target; the tolerance keeps δ = i/n exactly reachable
    k = np.clip(np.ceil(targets * n - 1e-9).astype(np.int64) - base, 0, first.size)
    counts = moved[k]
    counts[:, 0] += n - moved[k].sum(axis=1)  # everyone else stays at exit 1
    hits = base + k
    return _result("oracle", "delta", targets, hits, counts, correct, flops)


# ---------------------------------------------------------------------------------------------
# any policy
# ---------------------------------------------------------------------------------------------
def sweep_policy(
    policy_name: str, val: ExitOutputs, test: ExitOutputs, grid: np.ndarray | None = None, **params: Any
) -> SweepResult:
    """Fit ``policy_name`` (with ``params``) on ``val``, sweep its parameter and evaluate on ``test``.

    ``grid`` defaults to the policy's ``default_grid()``. PCEE and PCEE-WS are swept in closed form
    (the maps do not depend on δ); risk-controlled PCEE is fitted once and the certified δ' of each
    α is applied in closed form; threshold/temperature change only τ on the fitted policy;
    msdnet-budget and EERO are refitted per value; the oracle gives its cost-capped curve.
    """

    cls = get_policy_class(policy_name)
    if val.num_exits != test.num_exits or val.num_classes != test.num_classes:
        raise ValueError(
            f"val and test outputs disagree: {val.num_exits} vs {test.num_exits} exits, {val.num_classes} vs {test.num_classes} classes"
        )
    correct = test.logits.argmax(axis=-1) == test.labels[:, None]  # (N, L)
    flops = test.flops
    if cls.decides_with_labels:
        build_policy("oracle", **params)  # rejects parameters
        targets = default_delta_grid() if grid is None else np.asarray(grid, dtype=np.float64)
        return oracle_curve(correct, flops, targets)
    param = cls.param_name
    values = np.asarray(cls.default_grid() if grid is None else grid, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("the parameter grid is empty")
    if param in params:
        raise ValueError(
            f"{param!r} is the swept parameter of {policy_name!r}; give it as grid=, not as a fixed parameter"
        )
    if cls.sweeps_in_closed_form:
        _check_unit_grid(param, values)
        policy = build_policy(policy_name, **params)
        if not isinstance(policy, PCEEPolicy):
            raise TypeError(f"policy {policy_name!r} sweeps in closed form but has no reliability maps (map_values)")
        policy.fit(val.logits, val.labels, val.flops)
        return sweep_delta_closed_form(policy.map_values(test.logits), correct, flops, values, policy_name, param)
    if cls.certifies_itself:
        _check_unit_grid(param, values, open_interval=True)
        policy = build_policy(policy_name, **params)
        if not isinstance(policy, PCEEPolicy):
            raise TypeError(f"policy {policy_name!r} certifies itself but has no reliability maps (map_values)")
        policy.fit(val.logits, val.labels, val.flops)
        thresholds = np.empty(values.size)
        for i, a in enumerate(values):
            policy.set_params(**{param: float(a)})  # re-selects δ' from stored error counts, no refit
            thresholds[i] = policy.served_threshold()
        return sweep_delta_closed_form(
            policy.map_values(test.logits), correct, flops, thresholds, policy_name, param, targets=values
        )
    policy = build_policy(policy_name, **params)
    exits = np.empty((values.size, len(test)), dtype=np.int64)
    for i, v in enumerate(values):
        policy.set_params(**{param: float(v)})
        if not policy.is_fitted:  # a parameter the fit depends on changed (q, budget)
            with warnings.catch_warnings():
                # EERO warns when a budget is below exit 1's cost; a sweep over budgets meets such
                # values on purpose, and its row (everyone at exit 1) already says what happened
                warnings.simplefilter("ignore", RuntimeWarning)
                policy.fit(val.logits, val.labels, val.flops)
        exits[i] = policy.decide(test.logits)
    return sweep_exits(policy_name, param, values, exits, correct, flops)


def _check_unit_grid(param: str, values: np.ndarray, open_interval: bool = False) -> None:
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if open_interval:
        bad |= (values == 0) | (values == 1)
    if bad.any():
        rng = "(0, 1)" if open_interval else "[0, 1]"
        raise ValueError(f"{param} grid values must lie in {rng}; got {values[bad][:5].tolist()}")


# ---------------------------------------------------------------------------------------------
# selecting δ
# ---------------------------------------------------------------------------------------------
def select_delta(
    result: SweepResult, target_accuracy: float | None = None, flops_budget: float | None = None
) -> dict[str, Any]:
    """Pick an operating point of a sweep.

    Exactly one of:
    - ``target_accuracy``: the cheapest row (lowest mean FLOPs; ties: the smallest parameter)
      whose accuracy is >= the target;
    - ``flops_budget`` (mean FLOPs per sample, absolute): the most accurate row within the budget
      (ties: the cheapest, then the smallest parameter).

    Returns the row (as in :meth:`SweepResult.to_rows`) plus ``index`` (into the sweep) and
    ``met`` (whether the target/budget could be met). When no row meets it, the closest row is
    returned with ``met=False``: the most accurate row for a target, the cheapest for a budget.
    """
    if (target_accuracy is None) == (flops_budget is None):
        raise ValueError("give exactly one of target_accuracy or flops_budget")
    if len(result) == 0:
        raise ValueError("the sweep is empty")
    acc, cost, par = result.accuracy, result.mean_flops, result.delta
    if target_accuracy is not None:
        ok = acc >= float(target_accuracy) - 1e-12
        if ok.any():
            idx = np.flatnonzero(ok)
            i = int(idx[np.lexsort((par[idx], cost[idx]))[0]])
        else:
            i = int(np.lexsort((par, cost, -acc))[0])
    else:
        if flops_budget is None:  # unreachable: exactly one of the two is given (checked above)
            raise ValueError("give exactly one of target_accuracy or flops_budget")
        ok = cost <= float(flops_budget) * (1 + 1e-12)
        if ok.any():
            idx = np.flatnonzero(ok)
            i = int(idx[np.lexsort((par[idx], cost[idx], -acc[idx]))[0]])
        else:
            i = int(np.lexsort((par, -acc, cost))[0])
    row = result.to_rows()[i]
    row.update(index=i, met=bool(ok.any()))
    return row

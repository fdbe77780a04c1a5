"""`pcee sweep`: fit policies on val.npz, sweep δ (or their own parameter) on test.npz.

Writes OUT/sweep.csv (one row per parameter value of every requested policy), OUT/metrics.json
(per-exit test accuracy, ECE, failure AUROC, AURC; per-policy shortfall statistics and area gap
to the oracle) and the plots: reliability.png (the PCEE maps fitted on val; plus
reliability_pcee-ws.png when PCEE-WS runs), accuracy_vs_cost.png (every policy and the oracle),
achieved_vs_delta.png (policies whose parameter is an accuracy target), exit_histogram.png.
The curve table it prints is evaluated on test, for reporting; it chooses nothing.

With ``--target α`` (``--risk η``, ``--bound``) it also chooses each policy's operating point (the
oracle excepted) with :func:`pcee.operating_point.choose_operating_point` on val.npz alone (fit /
calibrate split, certified mode) and prints the table "Operating points (chosen on validation
only)"; test accuracy appears there only as a check, not used for choosing. The points go into
metrics.json under ``operating_points``.

The δ grid (--deltas) applies to pcee, pcee-ws and the oracle (accuracy targets), to threshold and
temperature's τ (their shortfall reads τ as an accuracy target, the naive rule) and, restricted to
(0, 1), to risk-controlled's α; msdnet-budget and EERO sweep their own default grid (q, budget).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from pcee import plots
from pcee.atomic import write_json_atomic
from pcee.calibration.scores import check_score
from pcee.cli.options import CHOICE_FLAGS, ChoiceSettings, add_choice_arguments, refuse_unused, resolve_policies
from pcee.latency import cost_vector, read_latency_profile
from pcee.metrics import oracle_area_gap, per_exit_metrics, shortfall_summary
from pcee.operating_point import CHECK_LABEL, choose_operating_point
from pcee.outputs import read_outputs_dir
from pcee.policies.pcee import PCEEPolicy
from pcee.policies.registry import LIMIT_POLICY, build_policy, get_policy_class
from pcee.sweep import is_accuracy_target, sweep_policy, write_rows_csv

HIST_DELTA = 0.9
SHORTFALL_FROM = 0.8  # the target range: achievable δ >= 0.8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--outputs", required=True, help="outputs-contract directory (val.npz, test.npz, meta.json)")
    p.add_argument("--policy", required=True, help="policy name, comma-separated names, or 'all'")
    p.add_argument(
        "--score", default="max_prob", help="confidence score: max_prob, entropy or margin (default max_prob)"
    )
    p.add_argument("--bins", type=int, default=15, help="reliability-map bins (default 15)")
    p.add_argument(
        "--min-count",
        type=float,
        default=10,
        help="bins with fewer validation samples never exit (plain PCEE; default 10)",
    )
    p.add_argument(
        "--deltas",
        default="0:1:0.005",
        help="δ grid as start:stop:step (inclusive) or a comma list (default 0:1:0.005)",
    )
    p.add_argument(
        "--hist-delta", type=float, default=HIST_DELTA, help=f"δ of the exit histogram plot (default {HIST_DELTA})"
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="target accuracy α in (0, 1): also choose each policy's certified operating point on validation only",
    )
    add_choice_arguments(p, "with --target")
    p.add_argument("--out", required=True, help="directory for sweep.csv, metrics.json and the PNG plots")


def parse_deltas(text: str) -> np.ndarray:
    """'start:stop:step' (stop included) or 'a,b,c' -> sorted unique grid in [0, 1]."""
    try:
        if ":" in text:
            parts = [float(v) for v in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise ValueError
            n = int(np.floor((stop - start) / step + 1e-9))
            grid = np.round(start + step * np.arange(n + 1), 10)
        else:
            grid = np.array([float(v) for v in text.split(",") if v.strip()])
    except ValueError:
        raise ValueError(
            f"--deltas must be start:stop:step with step > 0 (e.g. 0:1:0.005) or a comma list, got {text!r}"
        ) from None
    if grid.size == 0 or np.any(~np.isfinite(grid)) or grid.min() < 0 or grid.max() > 1:
        raise ValueError(f"--deltas values must lie in [0, 1], got {text!r}")
    return np.unique(grid)


def policy_params(name: str, score: str, bins: int, min_count: float) -> dict[str, Any]:
    """The common options that policy ``name`` accepts."""

    accepted = set(get_policy_class(name)._param_names())
    offered = {"score": score, "n_bins": bins, "min_count": min_count}
    return {k: v for k, v in offered.items() if k in accepted}


def grid_for(name: str, deltas: np.ndarray) -> np.ndarray | None:
    """The values policy ``name`` sweeps for the δ grid ``deltas`` (the policy says: ``sweep_grid``)."""

    return get_policy_class(name).sweep_grid(deltas)


def _table_rows(result) -> list[int]:
    """Indices of a readable subsample: δ on multiples of 0.05 for accuracy targets, else ~20 rows."""
    if is_accuracy_target(result.policy):
        on_grid = np.flatnonzero(np.isclose(np.round(result.delta / 0.05) * 0.05, result.delta, atol=1e-9))
        if on_grid.size:
            return on_grid.tolist()
    step = max(1, len(result) // 20)
    return list(range(0, len(result), step))


def format_table(results) -> str:
    num_exits = results[0].num_exits
    head = f"{'policy':<16}{'param':>7}{'value':>8}{'accuracy':>10}{'rel.cost':>10}{'shortfall':>11}  exits % (1..{num_exits})"
    lines = [head, "-" * len(head)]
    for r in results:
        for i in _table_rows(r):
            short = "" if np.isnan(r.shortfall[i]) else f"{r.shortfall[i]:.4f}"
            hist = " ".join(f"{100 * h:3.0f}" for h in r.exit_hist[i])
            lines.append(
                f"{r.policy:<16}{r.param_name:>7}{r.delta[i]:>8.3f}{r.accuracy[i]:>10.4f}{r.relative_cost[i]:>10.3f}{short:>11}  {hist}"
            )
        lines.append("")
    return "\n".join(lines)


def policy_metrics(results, oracle) -> dict[str, Any]:

    out: dict[str, Any] = {}
    for r in results:
        entry: dict[str, Any] = {
            "param_name": r.param_name,
            "area_gap_to_oracle": oracle_area_gap(r.relative_cost, r.accuracy, oracle.relative_cost, oracle.accuracy),
        }
        if is_accuracy_target(r.policy):
            entry["shortfall_achievable"] = shortfall_summary(r)
            entry[f"shortfall_achievable_ge_{SHORTFALL_FROM}"] = shortfall_summary(r, min_delta=SHORTFALL_FROM)
        out[r.policy] = entry
    return out


def choose_operating_points(names, val, test, args, deltas) -> dict[str, Any]:
    """Each policy's operating point (oracle excepted), chosen on ``val`` only; ``test`` is a check."""

    points = {}
    for name in names:
        if get_policy_class(name).decides_with_labels:
            continue
        points[name] = choose_operating_point(
            name,
            val,
            target_accuracy=args.target,
            risk=args.risk,
            bound=args.bound,
            mode="certified",
            calibrate_fraction=args.calibrate_fraction,
            seed=args.seed,
            params=policy_params(name, args.score, args.bins, args.min_count),
            grid=None if get_policy_class(name).certifies_itself else grid_for(name, deltas),
            test=test,
            cost=getattr(args, "cost_name", "flops"),
        )
    return points


def format_operating_points(points: dict[str, Any]) -> str:

    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    head = (
        f"{'policy':<16}{'mode':>10}{'α':>6}{'η':>6}  {'bound':<18}{'certified parameter':<24}{'n cal':>6}"
        f"{'acc lower':>10}{'rel.cost cal':>13}  {CHECK_LABEL}"
    )
    lines = ["Operating points (chosen on validation only)", head, "-" * len(head)]
    for name, op in points.items():
        param = f"{op.param_name}={f(op.value, '.4g')}"
        if op.served_threshold is not None and get_policy_class(op.policy_name).certifies_itself:
            param += f" (δ'={op.served_threshold:.4g})"
        if not op.certified:
            param = f"none ({param} served)"
        lines.append(
            f"{name:<16}{op.mode:>10}{op.target_accuracy:>6.3g}{op.risk:>6.3g}  {op.bound:<18}{param:<24}{op.n_calibrate:>6d}"
            f"{f(op.accuracy_lower_bound):>10}{f(op.relative_cost, '.3f'):>13}  {f(op.test_accuracy)}"
        )
    return "\n".join(lines)


def format_summary(metrics: dict[str, Any], final_accuracy: float) -> str:
    lines = [f"final-exit test accuracy {final_accuracy:.4f} (δ up to it is achievable)", ""]
    head = f"{'policy':<16}{'mean short':>11}{'max short':>11}{'n δ':>6}{'mean ≥0.8':>11}{'max ≥0.8':>10}{'n δ':>6}{'area gap':>10}"
    lines += [head, "-" * len(head)]
    for name, m in metrics.items():
        a = m.get("shortfall_achievable")
        b = m.get(f"shortfall_achievable_ge_{SHORTFALL_FROM}")
        if a is None:
            cols = f"{'-':>11}{'-':>11}{'-':>6}{'-':>11}{'-':>10}{'-':>6}"
        else:
            cols = f"{a['mean']:>11.4f}{a['max']:>11.4f}{a['n']:>6d}{b['mean']:>11.4f}{b['max']:>10.4f}{b['n']:>6d}"
        lines.append(f"{name:<16}{cols}{m['area_gap_to_oracle']:>10.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:

    names, deltas = _checked(args)
    splits, meta = read_outputs_dir(args.outputs)
    val, test = splits["val"], splits["test"]
    flops = test.flops
    cost_vec, args.cost_name = cost_vector(flops, read_latency_profile(args.latency_profile), args.cost)
    val, test = val.with_cost(cost_vec), test.with_cost(cost_vec)  # relative cost in the chosen unit
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results, oracle = _sweep_all(names, val, test, args, deltas)
    rows = [row for r in results for row in r.to_rows()]
    write_rows_csv(out / "sweep.csv", rows)
    metrics = _metrics(args, meta, val, test, flops, cost_vec, results, oracle)
    points = choose_operating_points(names, val, test, args, deltas) if args.target is not None else {}
    if points:
        metrics["operating_points"] = {
            "chosen_on": "validation only (calibrate part)",
            "test_accuracy_label": CHECK_LABEL,
            "policies": {name: op.to_dict() for name, op in points.items()},
        }
    write_json_atomic(out / "metrics.json", metrics)
    written = _plots(names, val, results, oracle, args, out)

    print("Sweep evaluated on test, for reporting (policies fitted on val; nothing is chosen here)")
    print(format_table(results))
    print(format_summary(metrics["policies"], results[0].final_accuracy))
    if points:
        print()
        print(format_operating_points(points))
    print()
    print(
        f"wrote {out / 'sweep.csv'} ({len(rows)} rows), {out / 'metrics.json'}, " + ", ".join(p.name for p in written)
    )
    return 0


def _checked(args: argparse.Namespace) -> tuple[list[str], np.ndarray]:
    """The policies and the δ grid; the choice flags checked and, with --target, their defaults filled in."""

    names = resolve_policies(args.policy)
    check_score(args.score)
    if args.bins < 1:
        raise ValueError(f"--bins must be >= 1, got {args.bins}")
    if args.min_count < 0:
        raise ValueError(f"--min-count must be >= 0, got {args.min_count}")
    deltas = parse_deltas(args.deltas)
    if args.target is None:
        refuse_unused(args, CHOICE_FLAGS, "with --target")
    else:
        choice = ChoiceSettings.from_args(args)
        args.risk, args.bound = choice.risk, choice.bound
        args.calibrate_fraction, args.seed = choice.calibrate_fraction, choice.seed
    return names, deltas


def _sweep_all(names: list[str], val, test, args: argparse.Namespace, deltas: np.ndarray) -> tuple[list, Any]:
    """Every named policy's sweep (fitted on val, evaluated on test), and the oracle's."""

    results = []
    for name in names:
        params = policy_params(name, args.score, args.bins, args.min_count)
        results.append(sweep_policy(name, val, test, grid=grid_for(name, deltas), **params))
    oracle = next((r for r in results if r.policy == LIMIT_POLICY), None) or sweep_policy(
        LIMIT_POLICY, val, test, grid=deltas
    )
    return results, oracle


def _metrics(args: argparse.Namespace, meta, val, test, flops, cost_vec, results, oracle) -> dict[str, Any]:

    return {
        "outputs": str(args.outputs),
        "meta": meta,
        "score": args.score,
        "n_val": len(val),
        "n_test": len(test),
        "flops": flops.tolist(),
        "cost": args.cost_name,
        "cost_per_exit": cost_vec.tolist(),
        "final_accuracy": results[0].final_accuracy,
        "per_exit_test": per_exit_metrics(test.logits, test.labels, score=args.score, n_bins=args.bins),
        "policies": policy_metrics(results, oracle),
        "curves_evaluated_on": "test (reporting only; every policy is fitted on val)",
    }


def _maps_of(name: str, val, args: argparse.Namespace):
    """The reliability maps of policy ``name`` fitted on val (for the reliability plot)."""

    policy = build_policy(name, **policy_params(name, args.score, args.bins, args.min_count))
    policy.fit(val.logits, val.labels, val.flops)
    if not isinstance(policy, PCEEPolicy):
        raise TypeError(f"policy {name!r} built as {type(policy).__name__}, not a PCEE policy with reliability maps")
    return policy.maps_


def _plots(names: list[str], val, results, oracle, args: argparse.Namespace, out: Path) -> list[Path]:

    written = [
        plots.plot_reliability(
            _maps_of("pcee", val, args), out / "reliability.png", title=f"PCEE reliability maps (val, {args.score})"
        )
    ]
    if "pcee-ws" in names:
        written.append(
            plots.plot_reliability(
                _maps_of("pcee-ws", val, args), out / "reliability_pcee-ws.png", title="PCEE-WS smoothed maps (val)"
            )
        )
    curves = results if any(r is oracle for r in results) else [*results, oracle]
    written.append(plots.plot_accuracy_vs_cost(curves, out / "accuracy_vs_cost.png"))
    targets = [r for r in results if get_policy_class(r.policy).has_reliability_maps]
    if targets:
        written.append(plots.plot_achieved_vs_delta(targets, out / "achieved_vs_delta.png"))
    hist_src = targets[0] if targets else results[0]
    hist_at = args.hist_delta if targets else float(np.median(hist_src.delta))
    written.append(plots.plot_exit_histogram(hist_src, hist_at, out / "exit_histogram.png"))
    return written

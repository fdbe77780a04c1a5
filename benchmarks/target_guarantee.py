"""Does the certified operating point keep its promise, and what does the promise cost?

For one trained model per dataset (digits small-cnn, 20 epochs; CIFAR-10 small-cnn at the evidence
CPU scale, ``imagefolder:../shared/data/cifar10``; both from the evidence cache under
``$PCEE_STATE_DIR/evidence/outputs``) the validation and test outputs are pooled. Each of ``--draws``
seeded resamples draws three disjoint parts of the pool: **fit** rows (reliability maps),
**calibrate** rows (choice and bound) and **evaluate** rows (never used by any choice). Targets α run
from the final exit's accuracy on the pool minus 6 points to minus 0.5 point. Methods, all with the
policy ``pcee``:

- ``certified/<bound>``: :func:`pcee.operating_point.choose_operating_point`, mode ``certified``
  (Learn-then-Test, fixed sequence), risk η = 0.1, on the fit + calibrate rows (its own seeded
  stratified split gives the drawn sizes);
- ``point``: the same call in mode ``point`` (cheapest δ with calibrate accuracy >= α; no guarantee);
- ``old test-selection``: maps fitted on fit + calibrate rows, δ the cheapest whose accuracy is >= α
  on a *selection* half of the evaluate rows (``sweep_policy`` + ``select_delta``, as the old
  pipeline did with test), evaluated on the other half.

Per (data, α, method): the miss rate (share of draws whose served point has accuracy < α on the
method's never-used evaluate rows: all of them for certified/point, the held-out half for the old
baseline), the draws that could not certify (served the most conservative point) and how many of
those fell below α, the median accuracy and relative cost, and the paired median cost ratio to the
point estimate. Verdicts: certified miss rate <= η at every target; certified cost within 1.25x of
the point estimate's at targets >= 2 points below the final exit; the recommended default bound.

Writes ``reports/target_guarantee.md`` and ``.json``; prints the table on stdout, progress on stderr.

Run: uv run python benchmarks/target_guarantee.py [--data digits|cifar10|both] [--draws 20] [--quick]
"""

from __future__ import annotations

import os

# one core: set before numpy/torch load their thread pools
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from pcee.atomic import to_jsonable, write_text_atomic  # noqa: E402
from pcee.operating_point import DEFAULT_BOUND, choose_operating_point  # noqa: E402
from pcee.outputs import ExitOutputs  # noqa: E402
from pcee.sweep import select_delta, sweep_policy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

POLICY = "pcee"
RISK = 0.1
BOUNDS = ("clopper-pearson", "hoeffding-bentkus", "wsr")
CERTIFIED = tuple(f"certified/{b}" for b in BOUNDS)
METHODS = CERTIFIED + ("point", "old test-selection")
#: targets: final-exit accuracy minus these (accuracy points / 100)
OFFSETS = (0.06, 0.04, 0.02, 0.01, 0.005)
#: the cost goal applies at targets at least this far below the final exit
COST_GOAL_OFFSET = 0.02
COST_GOAL_RATIO = 1.25
#: CIFAR-10 rows per draw (fit, calibrate); the rest of the 7,000 pooled rows evaluate
CIFAR_FIT, CIFAR_CAL = 1000, 1000


def progress(msg: str) -> None:
    print(f"[target_guarantee] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def synthetic_pool(n: int = 720, num_exits: int = 4, num_classes: int = 10, seed: int = 0) -> ExitOutputs:
    """Synthetic multi-exit outputs (later exits more accurate), as tests/policies/conftest.py."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    hardness = rng.uniform(0, 1, n)
    strength = np.linspace(0.8, 3.0, num_exits)[None, :] * (1.5 - hardness)[:, None]
    logits = rng.normal(size=(n, num_exits, num_classes))
    logits[np.arange(n), :, labels] += 2.0 * strength
    flops = np.cumsum(rng.uniform(1.0, 2.0, num_exits)) * 1e6
    return ExitOutputs(logits.astype(np.float32), labels.astype(np.int64), flops)


def _evidence_common():
    from benchmarks.evidence import evidence_common

    return evidence_common


def data_scale(name: str) -> dict[str, Any]:
    """The evidence-cache scale of the model used for ``name`` (model seed 0)."""
    ec = _evidence_common()
    if name == "digits":
        # the bundled digits at 20 epochs (as `pcee train --data digits --epochs 20`): ~10 s to train
        return dict(ec.SCALES["quick"], epochs=20, scale="digits-20ep", seed=0)
    if name == "cifar10":
        return dict(ec.SCALES["default"], scale="default", seed=0)
    raise ValueError(name)


def load_pool(name: str) -> tuple[ExitOutputs, dict[str, Any]]:
    """Pooled val + test outputs of one trained model (trained once, then read from the cache)."""
    if name == "synthetic":
        return synthetic_pool(), {
            "data": "synthetic (tests/policies/conftest.py-style)",
            "model": "none",
            "cached": True,
        }
    ec = _evidence_common()
    scale = data_scale(name)
    t0 = time.perf_counter()
    progress(
        f"{name}: training {scale['model']} on {scale['data']} ({scale['epochs']} epochs) or reading it from the cache ..."
    )
    tr = ec.trained(scale, "mixed")
    progress(
        f"{name}: outputs ready ({'cache' if tr.cached else f'trained in {tr.train_seconds:.0f} s'}; {time.perf_counter() - t0:.0f} s)"
    )
    pool = ExitOutputs(
        np.concatenate([tr.val.logits, tr.test.logits]), np.concatenate([tr.val.labels, tr.test.labels]), tr.val.flops
    )
    info = {
        "data": scale["data"],
        "model": f"{scale['model']} ({scale['preset']}), mixed regime, {scale['epochs']} epochs",
        "cache_key": tr.path.name,
        "cached": tr.cached,
        "n_val": len(tr.val),
        "n_test": len(tr.test),
    }
    return pool, info


def part_sizes(name: str, n: int) -> tuple[int, int, int]:
    """(fit, calibrate, evaluate) rows per draw."""
    if name == "cifar10" and n >= CIFAR_FIT + CIFAR_CAL + 1000:
        return CIFAR_FIT, CIFAR_CAL, n - CIFAR_FIT - CIFAR_CAL
    third = n // 3
    return third, third, n - 2 * third


# ---------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------
def run_dataset(name: str, pool: ExitOutputs, draws: int, seed: int) -> dict[str, Any]:
    """Every draw x target x method; returns the raw records and the per-cell summaries."""
    n = len(pool)
    n_fit, n_cal, n_eval = part_sizes(name, n)
    final_acc = float((pool.logits[:, -1].argmax(-1) == pool.labels).mean())
    targets = [round(final_acc - off, 4) for off in OFFSETS]
    frac = n_cal / (n_fit + n_cal)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for s in range(draws):
        rng = np.random.default_rng([int(seed), s])
        perm = rng.permutation(n)
        fc_idx, ev_idx = np.sort(perm[: n_fit + n_cal]), perm[n_fit + n_cal :]
        val, evaluate = pool.subset(fc_idx), pool.subset(ev_idx)
        half = ev_idx.size // 2
        selection, held = pool.subset(ev_idx[:half]), pool.subset(ev_idx[half:])
        # old pipeline: maps on fit + calibrate rows, δ chosen on the selection half, evaluated on the other half
        old_sel = sweep_policy(POLICY, val, selection)
        old_held = sweep_policy(POLICY, val, held)
        old_pool = sweep_policy(POLICY, val, pool)
        for alpha in targets:
            base = {"draw": s, "target": alpha, "offset": round(final_acc - alpha, 4)}
            for bound, method in zip(BOUNDS, CERTIFIED, strict=True):
                op = choose_operating_point(
                    POLICY,
                    val,
                    target_accuracy=alpha,
                    risk=RISK,
                    bound=bound,
                    mode="certified",
                    calibrate_fraction=frac,
                    seed=s,
                    test=evaluate,
                )
                assert op.n_fit == n_fit and op.n_calibrate == n_cal, (op.n_fit, op.n_calibrate)
                records.append(
                    {
                        **base,
                        "method": method,
                        "accuracy": op.test_accuracy,
                        "cost": op.test_relative_cost,
                        "pool_accuracy": op.checked_on(pool).test_accuracy,
                        "certified": op.certified,
                        "value": op.value,
                        "calibrate_accuracy": op.calibrate_accuracy,
                        "accuracy_lower_bound": op.accuracy_lower_bound,
                        "best_certifiable": op.best_certifiable_accuracy,
                        "n_eval": len(evaluate),
                    }
                )
            op = choose_operating_point(
                POLICY,
                val,
                target_accuracy=alpha,
                risk=RISK,
                mode="point",
                calibrate_fraction=frac,
                seed=s,
                test=evaluate,
            )
            met = any(row["passed"] for row in op.sweep)
            records.append(
                {
                    **base,
                    "method": "point",
                    "accuracy": op.test_accuracy,
                    "cost": op.test_relative_cost,
                    "pool_accuracy": op.checked_on(pool).test_accuracy,
                    "certified": met,
                    "value": op.value,
                    "calibrate_accuracy": op.calibrate_accuracy,
                    "accuracy_lower_bound": None,
                    "n_eval": len(evaluate),
                }
            )
            row = select_delta(old_sel, target_accuracy=alpha)
            i = int(row["index"])
            records.append(
                {
                    **base,
                    "method": "old test-selection",
                    "accuracy": float(old_held.accuracy[i]),
                    "cost": float(old_held.relative_cost[i]),
                    "pool_accuracy": float(old_pool.accuracy[i]),
                    "certified": bool(row["met"]),
                    "value": float(row["delta"]),
                    "calibrate_accuracy": float(row["accuracy"]),
                    "accuracy_lower_bound": None,
                    "n_eval": len(held),
                }
            )
        progress(f"{name}: draw {s + 1}/{draws} done ({time.perf_counter() - t0:.0f} s)")
    cells = summarise(records, targets, final_acc)
    return {
        "name": name,
        "n_pool": n,
        "sizes": {
            "fit": n_fit,
            "calibrate": n_cal,
            "evaluate": n_eval,
            "old_selection": n_eval // 2,
            "old_evaluate": n_eval - n_eval // 2,
        },
        "final_exit_accuracy": final_acc,
        "targets": targets,
        "draws": draws,
        "cells": cells,
        "records": records,
        "seconds": time.perf_counter() - t0,
    }


def summarise(records: list[dict[str, Any]], targets: list[float], final_acc: float) -> list[dict[str, Any]]:
    cells = []
    for alpha in targets:
        point = {r["draw"]: r for r in records if r["target"] == alpha and r["method"] == "point"}
        for method in METHODS:
            rs = [r for r in records if r["target"] == alpha and r["method"] == method]
            acc = np.array([r["accuracy"] for r in rs])
            cost = np.array([r["cost"] for r in rs])
            ok = np.array([r["certified"] for r in rs], dtype=bool)
            below = acc < alpha - 1e-12
            # certified: a miss of the guarantee is a *certified* point below α (an uncertified draw
            # says so and serves the most conservative point); point / old: any draw below α
            miss = (ok & below) if method in CERTIFIED else below
            pool_below = np.array([r["pool_accuracy"] for r in rs]) < alpha - 1e-12
            pool_miss = (ok & pool_below) if method in CERTIFIED else pool_below
            ratio = np.array([r["cost"] / point[r["draw"]]["cost"] for r in rs])
            margin = np.array([r["calibrate_accuracy"] - alpha for r in rs])
            best_cert = np.array([r["best_certifiable"] for r in rs if r.get("best_certifiable") is not None])
            slack = np.array(
                [
                    r["calibrate_accuracy"] - r["accuracy_lower_bound"]
                    for r in rs
                    if r["accuracy_lower_bound"] is not None
                ]
            )
            cells.append(
                {
                    "target": alpha,
                    "offset": round(final_acc - alpha, 4),
                    "method": method,
                    "draws": len(rs),
                    "miss_rate": float(miss.mean()),
                    "misses": int(miss.sum()),
                    "below_rate": float(below.mean()),
                    "below": int(below.sum()),
                    "pool_miss_rate": float(pool_miss.mean()),
                    "not_met": int((~ok).sum()),
                    "not_met_below": int((~ok & below).sum()),
                    "median_accuracy": float(np.median(acc)),
                    "median_cost": float(np.median(cost)),
                    "cost_ratio_to_point": float(np.median(ratio)),
                    "ratio_of_median_costs": float(np.median(cost) / np.median([p["cost"] for p in point.values()])),
                    "median_best_certifiable": float(np.median(best_cert)) if best_cert.size else None,
                    "median_calibrate_margin": float(np.median(margin)),
                    "median_bound_slack": float(np.median(slack)) if slack.size else None,
                }
            )
    return cells


# ---------------------------------------------------------------------------------------------
# verdicts and the report
# ---------------------------------------------------------------------------------------------
def miss_slack(draws: int, risk: float = RISK, level: float = 0.05) -> float:
    """Largest miss rate out of ``draws`` not surprising (one-sided, ``level``) if the true rate is ``risk``."""
    k = 0
    while k < draws and stats.binom.sf(k, draws, risk) > level:  # P(X >= k + 1) > level
        k += 1
    return k / draws


def table_lines(res: dict[str, Any]) -> list[str]:
    sz = res["sizes"]
    info = res["info"]
    parts = f" (val {info['n_val']} + test {info['n_test']})" if "n_val" in info else ""
    lines = [
        f"### {res['name']}: `{info['data']}` — {info['model']}",
        "",
        f"Pool: {res['n_pool']} rows{parts}; final-exit "
        f"accuracy on the pool {res['final_exit_accuracy']:.4f}. Per draw ({res['draws']} draws): fit {sz['fit']} / calibrate "
        f"{sz['calibrate']} / evaluate {sz['evaluate']} rows (old test-selection: selection {sz['old_selection']} / evaluate "
        f"{sz['old_evaluate']} of the evaluate rows). η = {RISK}.",
        "",
        "| α (final − pts) | method | miss rate | all draws < α | miss on pool acc. | not certified / not met (of which < α) | median accuracy | median rel. cost | cost / point: paired median (ratio of medians) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cells"]:
        lines.append(
            f"| {c['target']:.4f} (−{100 * c['offset']:.1f}) | {c['method']} | {c['miss_rate']:.2f} ({c['misses']}/{c['draws']}) | "
            f"{c['below_rate']:.2f} | {c['pool_miss_rate']:.2f} | {c['not_met']} ({c['not_met_below']}) | {c['median_accuracy']:.4f} | {c['median_cost']:.4f} | {c['cost_ratio_to_point']:.3f} ({c['ratio_of_median_costs']:.3f}) |"
        )
    lines.append("")
    return lines


def verdicts(results: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    out: list[str] = []
    summary: dict[str, Any] = {"miss_ok": {}, "cost_ok": {}}
    for res in results:
        draws = res["draws"]
        slack = miss_slack(draws)
        res["miss_slack"] = slack
        name = res["name"]
        for method in CERTIFIED:
            cells = [c for c in res["cells"] if c["method"] == method]
            over = [c for c in cells if c["miss_rate"] > RISK + 1e-12]
            over_slack = [c for c in cells if c["miss_rate"] > slack + 1e-12]
            ok = not over
            summary["miss_ok"][(name, method)] = {"strict": ok, "with_slack": not over_slack}
            if ok:
                out.append(
                    f"- **{name}, {method}**: miss rate <= η = {RISK} at every target: **yes** "
                    f"(max {max(c['miss_rate'] for c in cells):.2f})."
                )
            else:
                where = ", ".join(
                    f"α={c['target']:.4f}: {c['miss_rate']:.2f} (on the pool accuracy {c['pool_miss_rate']:.2f})"
                    for c in over
                )
                out.append(
                    f"- **{name}, {method}**: miss rate <= η = {RISK} at every target: **no** ({where}); within the "
                    f"sampling slack of {draws} draws (<= {slack:.2f}, one-sided 5%): **{'yes' if not over_slack else 'no'}**."
                )
            n_not = sum(c["not_met"] for c in cells)
            if n_not:
                out.append(
                    f"  could not certify in {n_not} of {sum(c['draws'] for c in cells)} (draw, target) pairs (per target "
                    + ", ".join(f"{c['not_met']}" for c in cells)
                    + "); of those, "
                    f"{sum(c['not_met_below'] for c in cells)} served a most-conservative point below α (not a miss of the guarantee: "
                    "the result says it is not certified)."
                )
            goal = [c for c in cells if c["offset"] >= COST_GOAL_OFFSET - 1e-9]
            bad = [c for c in goal if c["cost_ratio_to_point"] > COST_GOAL_RATIO]
            summary["cost_ok"][(name, method)] = not bad
            if not bad:
                rom = [c for c in goal if c["ratio_of_median_costs"] > COST_GOAL_RATIO]
                note = (
                    "; but the ratio of the median costs exceeds it at "
                    + ", ".join(
                        f"α={c['target']:.4f} ({c['ratio_of_median_costs']:.3f}, {c['not_met']}/{c['draws']} draws not certified)"
                        for c in rom
                    )
                    if rom
                    else ""
                )
                out.append(
                    f"  cost within {COST_GOAL_RATIO}x of the point estimate at targets >= {100 * COST_GOAL_OFFSET:.0f} points "
                    f"below the final exit: **yes** (max paired-median ratio {max(c['cost_ratio_to_point'] for c in goal):.3f}{note})."
                )
            else:
                why = []
                for c in bad:
                    pt = next(p for p in res["cells"] if p["method"] == "point" and p["target"] == c["target"])
                    reason = (
                        f"α={c['target']:.4f}: {c['cost_ratio_to_point']:.3f}x — the bound on {res['sizes']['calibrate']} calibrate "
                        f"rows takes a median {100 * (c['median_bound_slack'] or 0):.1f} points off the calibrate accuracy, so the "
                        f"certified point needs calibrate accuracy about α + that (median margin {100 * c['median_calibrate_margin']:.1f} "
                        f"points vs {100 * pt['median_calibrate_margin']:.1f} for the point estimate)"
                    )
                    if c["not_met"]:
                        reason += (
                            f"; {c['not_met']}/{c['draws']} draws could not certify and served the most conservative point "
                            f"(median best certifiable accuracy {c['median_best_certifiable']:.4f} vs α {c['target']:.4f})"
                        )
                    why.append(reason)
                out.append(
                    f"  cost within {COST_GOAL_RATIO}x of the point estimate at targets >= {100 * COST_GOAL_OFFSET:.0f} points "
                    f"below the final exit: **no** — " + "; ".join(why) + "."
                )
        for method in ("point", "old test-selection"):
            cells = [c for c in res["cells"] if c["method"] == method]
            out.append(
                f"- {name}, {method} (no guarantee): miss rate per target "
                + ", ".join(f"{c['miss_rate']:.2f}" for c in cells)
                + " (α = "
                + ", ".join(f"{c['target']:.4f}" for c in cells)
                + ")."
            )
    # the recommended default: the cheapest bound whose miss rate stays within η + slack everywhere
    mean_cost = {}
    for method in CERTIFIED:
        cs = [c["median_cost"] for res in results for c in res["cells"] if c["method"] == method]
        mean_cost[method] = float(np.mean(cs))
    eligible = [m for m in CERTIFIED if all(v["with_slack"] for (d, mm), v in summary["miss_ok"].items() if mm == m)]
    pool = eligible or list(CERTIFIED)
    best = min(
        pool,
        key=lambda m: (
            round(mean_cost[m], 6),
            sum(c["not_met"] for res in results for c in res["cells"] if c["method"] == m),
        ),
    )
    bound = best.split("/", 1)[1]
    summary.update(mean_cost=mean_cost, eligible=eligible, recommended=bound)
    cost_text = ", ".join(f"{m.split('/', 1)[1]} {mean_cost[m]:.4f}" for m in CERTIFIED)
    max_miss = {m: max(c["miss_rate"] for res in results for c in res["cells"] if c["method"] == m) for m in CERTIFIED}
    max_pool = {
        m: max(c["pool_miss_rate"] for res in results for c in res["cells"] if c["method"] == m) for m in CERTIFIED
    }
    n_not = {m: sum(c["not_met"] for res in results for c in res["cells"] if c["method"] == m) for m in CERTIFIED}
    n_all = sum(c["draws"] for res in results for c in res["cells"] if c["method"] == CERTIFIED[0])
    summary.update(max_miss=max_miss, max_pool_miss=max_pool, not_certified=n_not)
    detail = "; ".join(
        f"{m.split('/', 1)[1]}: max miss {max_miss[m]:.2f} on evaluate rows, {max_pool[m]:.2f} on the pool accuracy, "
        f"not certified in {n_not[m]}/{n_all}"
        for m in CERTIFIED
    )
    out.append("")
    out.append(
        f"**Recommended default bound: `{bound}`** — the lowest mean of median relative costs over every (data, target) cell "
        f"({cost_text}) among the bounds whose miss rate stays <= η + sampling slack at every target "
        f"({', '.join(m.split('/', 1)[1] for m in eligible) or 'none: chosen among all'}). "
        f"The library default (`pcee.operating_point.DEFAULT_BOUND`) is `{DEFAULT_BOUND}`"
        + (" — they agree." if bound == DEFAULT_BOUND else f" — consider changing it to `{bound}`.")
        + f" Per bound, over every (data, target) cell: {detail}."
    )
    return out, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("digits", "cifar10", "both"), default="both")
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="smoke run: digits only, 5 draws")
    p.add_argument("--seed", type=int, default=0, help="seed of the resamples")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (the CPU is shared)")
    p.add_argument("--report-dir", type=Path, default=REPO / "reports")
    p.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)  # tests: synthetic outputs, no training
    args = p.parse_args(argv)
    if args.draws < 1:
        p.error("--draws must be >= 1")
    t0 = time.perf_counter()
    if args.quick:
        names, draws = ["digits"], min(args.draws, 5)
    else:
        names, draws = (["digits", "cifar10"] if args.data == "both" else [args.data]), args.draws
    if args.synthetic:
        names = ["synthetic"]
    if not args.synthetic:  # training may happen: one torch thread unless told otherwise
        import torch

        torch.set_num_threads(max(1, int(args.threads)))
    results, skipped = [], []
    for name in names:
        if name == "cifar10":
            root = _evidence_common().CIFAR10
            if not Path(root).is_dir():
                skipped.append(f"cifar10: no data at {root} (relative to {os.getcwd()}); not run")
                progress(skipped[-1])
                continue
        pool, info = load_pool(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = run_dataset(name, pool, draws, args.seed)
        res["info"] = info
        results.append(res)
    if not results:
        print("no dataset could be run: " + "; ".join(skipped), file=sys.stderr)
        return 1
    verdict_lines, summary = verdicts(results)
    seconds = time.perf_counter() - t0
    scale = "quick" if args.quick else "synthetic" if args.synthetic else "default"
    body = [
        "# Target guarantee: certified vs point-estimate vs old test-selection operating points",
        "",
        f"Scale: **{scale}**, {draws} seeded resamples per dataset (seed {args.seed}), policy `{POLICY}`, risk η = {RISK}. "
        "Accuracy and cost are measured on never-used evaluate rows (finite rows, so a point just above α can fall below it "
        "by the evaluate rows' own sampling noise). **Miss rate**: certified methods — share of draws that returned a "
        "*certified* point whose accuracy is < α (what Learn-then-Test bounds by η); point and old test-selection — share of "
        "draws whose served point is < α. **All draws < α** counts every draw, including those that could not certify "
        "(no point passed the fixed sequence; the most conservative point, δ = 1, is served and labelled not certified) or, "
        "for point / old, where no point reached α on the choosing rows (the most conservative / most accurate point is "
        "served). Cost = mean FLOPs / final-exit FLOPs; cost / point = median over draws of the paired ratio to the point "
        "estimate's cost (same draw, same rows). **Miss on pool acc.**: the same miss counted with the served point's "
        "accuracy on the whole pool (the population the draws come from; free of the evaluate rows' noise, slightly "
        "optimistic because it includes the fit and calibrate rows).",
        "",
    ]
    for res in results:
        body += table_lines(res)
    body += ["## Verdicts", ""] + verdict_lines + [""]
    if skipped:
        body += ["Not run: " + "; ".join(skipped), ""]
    command = " ".join(["python benchmarks/target_guarantee.py", *(argv if argv is not None else sys.argv[1:])])
    body += [
        f"_Command: `{command}`; wall time {seconds:.0f} s (training included unless the models came from the cache)._",
        "",
    ]
    text = "\n".join(body) + "\n"
    out_dir = Path(args.report_dir)
    payload = {
        "scale": scale,
        "draws": draws,
        "seed": args.seed,
        "risk": RISK,
        "policy": POLICY,
        "methods": list(METHODS),
        "offsets": list(OFFSETS),
        "wall_seconds": seconds,
        "skipped": skipped,
        "recommended_bound": summary["recommended"],
        "mean_median_cost": summary["mean_cost"],
        "eligible_bounds": summary["eligible"],
        "verdicts": {
            f"{d}|{m}": {"miss": v, "cost_within_goal": summary["cost_ok"][(d, m)]}
            for (d, m), v in summary["miss_ok"].items()
        },
        "datasets": results,
    }
    write_text_atomic(
        out_dir / "target_guarantee.json",
        json.dumps(to_jsonable(payload, nonfinite_as_null=True), indent=2, sort_keys=True) + "\n",
    )
    write_text_atomic(out_dir / "target_guarantee.md", text)
    print(text, flush=True)
    progress(f"wrote {out_dir / 'target_guarantee.md'} and .json ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

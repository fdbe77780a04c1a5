"""Does pcee keep its accuracy promise under shift, with and without labels? (issue 11's benchmark)

For one trained model per dataset (digits small-cnn, 20 epochs; CIFAR-10 small-cnn at the evidence
CPU scale, ``imagefolder:../shared/data/cifar10``, 6 epochs; both mixed regime, model seed 0, from the
evidence cache under ``$PCEE_STATE_DIR/evidence/outputs``, trained there when missing) the target is
α = floor((final-exit validation accuracy − ``--margin``)·100)/100 (margin 0.05), risk η = 0.1,
Clopper–Pearson. Everything below is fitted on the validation outputs only:

- the **champion**: :func:`pcee.operating_point.choose_operating_point` ``("pcee", val, α, η)``
  (certified; its ``answer_rule`` is the static ρ);
- the **ATC estimator**: :class:`pcee.label_free.ATCEstimator` fitted on the validation outputs;
- the **drift monitor**: :class:`monitoring.monitor.DriftMonitor` with the champion's validation
  confidences (:func:`monitoring.reference.reference_from_logits`) as reference.

Conditions: the clean test stream; each corruption of :data:`pcee.data.corruptions.CORRUPTIONS` at
severities 3 and 5 applied to the test images; a class-prior shift (three classes, chosen with a
seeded rng, make 70% of the traffic: test rows resampled with replacement, *within* each fold so that
no image is in both folds). The test rows are split once (seeded) into two folds, the same rows for
every condition; one fold **recalibrates**, the other **evaluates**, then they swap and the two are
averaged (shortfalls: mean of the folds; accuracies and coverage: pooled over both folds' rows).

Per condition, on the evaluation fold:

- **static**: the champion, every request answered: shortfall max(0, α − accuracy);
- **label-free (0 labels)**: :func:`pcee.label_free.label_free_refit` on the all-exit logits of up to
  ``--shadow-rows`` recalibration rows (no labels); its policy and ρ are served when accepted, else
  the champion's;
- **labelled (≤ ``--max-labels`` labels)**: :func:`pcee.recalibration.recalibrate` (α, η,
  Clopper–Pearson) on up to ``--max-labels`` labelled recalibration rows; ``result.policy`` and its
  ``answer_rule`` are served when ``result.accepted``, else the champion's;
- **floor**: max(0, α − final-exit accuracy): what running every request to the end would miss;
- accuracy on answered and coverage under ``abstain`` (answered = expected accuracy at the exit
  that answers >= ρ) for both versions;
- **ATC error**: |ATC estimate − measured| of the final exit's accuracy (every exit in the JSON);
- **detection delay**: 200 clean test rows, then the condition's rows in a seeded order, in chunks
  of 50; after each chunk the monitor checks the last 200 requests as the service logs them (the
  champion's confidences, NaN after each request's exit); the delay is the number of shifted rows
  sent when the first alarm fires ("none" within ``--stream-rows`` rows). On the clean condition an
  alarm is a false alarm.

Goals (PASS/FAIL, with the numbers and a likely reason for each failure): accuracy on answered >=
α − 1 point in every condition (label-free and labelled judged separately; a version that answers
nothing passes vacuously and says so); the label-free refit removes at least half of the static
shortfall above the floor, (static − label-free) >= 0.5·(static − floor) wherever static > floor;
coverage on the clean stream >= 0.98 for every version (champion, label-free, labelled) whose clean
accuracy meets α; mean |ATC error| of the final exit over the conditions <= 3 points.

Writes ``reports/shift_control.md``, ``.json`` and ``reports/figures/shift_control.png``; prints the
report on stdout, progress on stderr.

Run: uv run --locked python benchmarks/shift_control.py [--quick] [--datasets digits cifar10]
"""

from __future__ import annotations

import os

# set before numpy/torch load their thread pools (the CPU is shared)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EVIDENCE = REPO / "benchmarks" / "evidence"
if str(EVIDENCE) not in sys.path:  # evidence_common: the evidence scripts' shared helpers, beside them
    sys.path.insert(0, str(EVIDENCE))

from pcee.atomic import to_jsonable, write_text_atomic  # noqa: E402
from pcee.outputs import ExitOutputs  # noqa: E402

POLICY = "pcee"
RISK = 0.1
BOUND = "clopper-pearson"
SEVERITIES = (3, 5)
QUICK_SEVERITIES = (3,)
PRIOR_CLASSES = 3
PRIOR_SHARE = 0.7
CLEAN_PREFIX = 200  # clean requests streamed before the shift
CHUNK = 50  # requests per monitor check
WINDOW = 200  # the monitor's window (last requests)
#: goals
ANSWERED_SLACK = 0.01  # accuracy on answered >= α − 1 point
LF_SHARE = 0.5  # the label-free refit removes >= half of (static − floor)
CLEAN_COVERAGE = 0.98
ATC_GOAL = 0.03
VERSIONS = ("static", "label_free", "labelled")


def progress(msg: str) -> None:
    print(f"[shift_control] {msg}", file=sys.stderr, flush=True)


def _ec():
    import evidence_common

    return evidence_common


# ---------------------------------------------------------------------------------------------
# models and conditions
# ---------------------------------------------------------------------------------------------
def data_scale(name: str, quick: bool) -> dict[str, Any]:
    """The evidence-cache scale of the model used for ``name`` (model seed 0, so the cache hits)."""
    ec = _ec()
    if name == "digits":
        if quick:  # the evidence --quick model: 3 epochs, a few seconds to train
            return dict(ec.SCALES["quick"], scale="quick", seed=0)
        # the bundled digits at 20 epochs (as benchmarks/target_guarantee.py); the cache key (in the report)
        # also names the training environment (--threads, the machine): evidence_common.cache_spec
        return dict(ec.SCALES["quick"], epochs=20, scale="digits-20ep", seed=0)
    if name == "cifar10":
        return dict(ec.SCALES["default"], scale="default", seed=0)
    raise ValueError(f"unknown dataset {name!r}")


def condition_names(severities: tuple[int, ...]) -> list[str]:
    from pcee.data.corruptions import CORRUPTIONS

    return ["clean"] + [f"{c}/{s}" for s in severities for c in CORRUPTIONS] + ["class_prior"]


def prior_resample(labels: np.ndarray, rows: np.ndarray, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``len(rows)`` rows drawn with replacement from ``rows`` so that ``classes`` make PRIOR_SHARE of them."""
    inside = np.isin(labels[rows], classes)
    w = np.where(inside, PRIOR_SHARE / max(int(inside.sum()), 1), (1.0 - PRIOR_SHARE) / max(int((~inside).sum()), 1))
    return rng.choice(rows, size=rows.size, replace=True, p=w / w.sum())


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def served_counts(policy, rule, ev: ExitOutputs) -> dict[str, float]:
    """Counts of one served (exit rule, answer rule) on evaluation rows (abstain mode)."""
    from pcee.selective import expected_at_exit

    exits, expected = expected_at_exit(policy, ev.logits)
    answered = rule.answered(expected)
    correct = ev.logits[np.arange(exits.size), exits].argmax(-1) == ev.labels
    return {
        "n": int(exits.size),
        "correct": int(correct.sum()),
        "answered": int(answered.sum()),
        "answered_correct": int(correct[answered].sum()),
        "cost": float((ev.flops[exits] / ev.flops[-1]).sum()),
        "answered_expected": float(np.nansum(expected[answered])),
        # declined rows whose map value is 0: bins with fewer than min_count fitting rows (PCEE maps them to 0)
        "declined_zero": int((~answered & (np.nan_to_num(expected, nan=0.0) <= 0.0)).sum()),
    }


def summarise_version(per_fold: list[dict[str, float]], alpha: float) -> dict[str, Any]:
    n = sum(f["n"] for f in per_fold)
    ans = sum(f["answered"] for f in per_fold)
    shortfalls = [max(0.0, alpha - f["correct"] / f["n"]) for f in per_fold]
    return {
        "accuracy": sum(f["correct"] for f in per_fold) / n,
        "shortfall": float(np.mean(shortfalls)),
        "shortfall_per_fold": shortfalls,
        "answered_accuracy": (sum(f["answered_correct"] for f in per_fold) / ans) if ans else float("nan"),
        "coverage": ans / n,
        "n_answered": ans,
        "n": n,
        "relative_cost": sum(f["cost"] for f in per_fold) / n,
        # the version's own estimate of its accuracy on answered (mean map value of the answered rows)
        "answered_accuracy_estimated": (sum(f["answered_expected"] for f in per_fold) / ans) if ans else float("nan"),
        "declined": n - ans,
        "declined_zero_map_value": sum(f["declined_zero"] for f in per_fold),
    }


def detection_delay(monitor, policy, clean: ExitOutputs, shifted: ExitOutputs, stream_rows: int, rng) -> dict[str, Any]:
    """Shifted rows sent until the first alarm (checks every CHUNK rows on the last WINDOW rows)."""
    from monitoring.reference import reference_from_logits

    pre = rng.choice(len(clean), size=CLEAN_PREFIX, replace=len(clean) < CLEAN_PREFIX)
    post = rng.permutation(len(shifted))[: int(stream_rows)]
    logits = np.concatenate([clean.logits[pre], shifted.logits[post]])
    conf, exits = reference_from_logits(logits, policy)  # what the service logs per request
    prefix_alarm = bool(
        monitor.check(conf[CLEAN_PREFIX - WINDOW : CLEAN_PREFIX], exits[CLEAN_PREFIX - WINDOW : CLEAN_PREFIX]).drifted
    )
    checks = 0
    for end in range(CLEAN_PREFIX + CHUNK, len(logits) + 1, CHUNK):
        checks += 1
        if monitor.check(conf[end - WINDOW : end], exits[end - WINDOW : end]).drifted:
            return {
                "delay": end - CLEAN_PREFIX,
                "streamed": int(post.size),
                "checks": checks,
                "clean_prefix_alarm": prefix_alarm,
            }
    return {"delay": None, "streamed": int(post.size), "checks": checks, "clean_prefix_alarm": prefix_alarm}


def run_condition(
    name: str, out: ExitOutputs, folds: list[tuple[np.ndarray, np.ndarray]], ctx: dict[str, Any]
) -> dict[str, Any]:
    """Both fold orders of one condition: static / label-free / labelled versions, floor, ATC."""
    from pcee.label_free import label_free_refit
    from pcee.recalibration import recalibrate
    from pcee.selective import AnswerRule

    args, alpha, champ, static_rule, atc = ctx["args"], ctx["alpha"], ctx["champion"], ctx["static_rule"], ctx["atc"]
    counts: dict[str, list] = {v: [] for v in VERSIONS}
    final_acc, atc_err, atc_est, atc_true, lf_info, rc_info = [], [], [], [], [], []
    for rec, ev in folds:
        r_out, e_out = out.subset(rec), out.subset(ev)
        shadow = r_out.logits[: args.shadow_rows]
        lf = label_free_refit(
            champ.policy, shadow, atc, target_accuracy=alpha, old_rule=static_rule, flops=out.flops, seed=args.seed
        )
        lf_pol, lf_rule = (lf.policy, lf.answer_rule) if lf.accepted else (champ.policy, static_rule)
        k = args.max_labels
        rc = recalibrate(
            champ.policy,
            r_out.logits[:k],
            r_out.labels[:k],
            flops=out.flops,
            target_accuracy=alpha,
            risk=RISK,
            bound=BOUND,
            seed=args.seed,
        )
        lab_pol, lab_rule = (
            (rc.policy, AnswerRule.from_dict(rc.answer_rule)) if rc.accepted else (champ.policy, static_rule)
        )
        counts["static"].append(served_counts(champ.policy, static_rule, e_out))
        counts["label_free"].append(served_counts(lf_pol, lf_rule, e_out))
        counts["labelled"].append(served_counts(lab_pol, lab_rule, e_out))
        measured = _ec().correct_matrix(e_out).mean(axis=0)
        estimate = atc.estimate(e_out.logits)
        final_acc.append(float(measured[-1]))
        atc_est.append(estimate)
        atc_true.append(measured)
        atc_err.append(np.abs(estimate - measured))
        lf_info.append(
            {
                "status": lf.status,
                "n_shadow": int(shadow.shape[0]),
                "rho": None if not lf.accepted else lf_rule.threshold,
                "atc_final_on_shadow": None if lf.estimated_accuracy is None else lf.estimated_accuracy[-1],
                "old_agreement": lf.old_agreement,
                "new_agreement": lf.new_agreement,
                "reason": lf.reason,
            }
        )
        rc_info.append(
            {
                "status": rc.status,
                "n_labels": int(min(k, len(rec))),
                "n_holdout": rc.n_holdout,
                "rho": lab_rule.threshold if rc.accepted else None,
                "rule_kind": lab_rule.kind if rc.accepted else None,
                "new_threshold": rc.new_threshold,
                "reason": rc.reason,
            }
        )
    res: dict[str, Any] = {v: summarise_version(counts[v], alpha) for v in VERSIONS}
    res["final_accuracy"] = float(np.mean(final_acc))
    res["floor"] = float(np.mean([max(0.0, alpha - a) for a in final_acc]))
    res["atc_estimate"] = np.mean(atc_est, axis=0).tolist()
    res["atc_measured"] = np.mean(atc_true, axis=0).tolist()
    res["atc_abs_error"] = np.mean(atc_err, axis=0).tolist()  # per exit, mean over the folds
    res["atc_error_final"] = float(res["atc_abs_error"][-1])
    res["atc_signed_error_final"] = float(np.mean([e[-1] - t[-1] for e, t in zip(atc_est, atc_true, strict=True)]))
    res["label_free"]["folds"] = lf_info
    res["labelled"]["folds"] = rc_info
    res["n_rows"] = len(out)
    res["alpha"] = alpha
    res["static_rho"] = float(static_rule.threshold)
    return res


def run_dataset(name: str, args: argparse.Namespace, severities: tuple[int, ...]) -> dict[str, Any]:
    from monitoring.monitor import DriftMonitor
    from monitoring.reference import reference_from_logits
    from pcee.data.corruptions import CORRUPTIONS, corrupt
    from pcee.data.datasets import ArraySplit
    from pcee.label_free import ATCEstimator
    from pcee.operating_point import choose_operating_point
    from pcee.selective import AnswerRule
    from pcee.training.evaluate import compute_outputs

    ec = _ec()
    t0 = time.perf_counter()
    scale = data_scale(name, args.quick)
    progress(
        f"{name}: training {scale['model']} on {scale['data']} ({scale['epochs']} epochs) or reading it from the cache ..."
    )
    m = ec.trained(scale, "mixed")
    progress(f"{name}: model ready ({'cache ' + m.path.name if m.cached else f'trained in {m.train_seconds:.0f} s'})")
    splits = ec.load_splits(scale)
    val_acc = ec.correct_matrix(m.val).mean(axis=0)
    alpha = float(math.floor((float(val_acc[-1]) - args.margin) * 100 + 1e-9) / 100)
    champ = choose_operating_point(POLICY, m.val, target_accuracy=alpha, risk=RISK, bound=BOUND, seed=args.seed)
    static_rule = AnswerRule.from_dict(champ.answer_rule)
    atc = ATCEstimator().fit(m.val.logits, m.val.labels)
    monitor = DriftMonitor(*reference_from_logits(m.val.logits, champ.policy))
    ctx = {"args": args, "alpha": alpha, "champion": champ, "static_rule": static_rule, "atc": atc}
    progress(f"{name}: α = {alpha:.2f}; champion: {champ.guarantee}")

    rng = np.random.default_rng([int(args.seed), 11])
    n = len(m.test)
    order = rng.permutation(n)
    a, b = order[: n // 2], order[n // 2 :]
    folds = [(a, b), (b, a)]
    model = m.model()
    conditions: dict[str, dict[str, Any]] = {}
    for cond in condition_names(severities):
        t1 = time.perf_counter()
        if cond == "clean":
            out, cond_folds = m.test, folds
        elif cond == "class_prior":
            classes = np.sort(rng.choice(int(m.test.logits.shape[-1]), size=PRIOR_CLASSES, replace=False))
            ra, rb = prior_resample(m.test.labels, a, classes, rng), prior_resample(m.test.labels, b, classes, rng)
            out = m.test.subset(np.concatenate([ra, rb]))  # rows 0..|a|-1 from fold a, the rest from fold b
            ia, ib = np.arange(ra.size), np.arange(ra.size, ra.size + rb.size)
            cond_folds = [(ia, ib), (ib, ia)]
        else:
            corruption, sev = cond.split("/")
            assert corruption in CORRUPTIONS
            xc = corrupt(splits.test.x, corruption, int(sev), seed=args.seed)
            out = compute_outputs(
                model, ArraySplit(np.ascontiguousarray(xc, dtype=np.float32), splits.test.y), m.test.flops
            )
            cond_folds = folds
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = run_condition(cond, out, cond_folds, ctx)
            res["detection"] = detection_delay(monitor, champ.policy, m.test, out, args.stream_rows, rng)
        if cond == "class_prior":
            res["prior_classes"] = classes.tolist()
            res["prior_share_measured"] = float(np.isin(out.labels, classes).mean())
        conditions[cond] = res
        progress(
            f"{name}: {cond} done ({time.perf_counter() - t1:.1f} s): static shortfall {res['static']['shortfall']:.4f}, "
            f"label-free {res['label_free']['shortfall']:.4f}, labelled {res['labelled']['shortfall']:.4f}, floor {res['floor']:.4f}"
        )
    info = {
        "data": scale["data"],
        "model": f"{scale['model']} ({scale['preset']}), mixed regime, {scale['epochs']} epochs, model seed 0",
        "cache_key": m.path.name,
        "cached": m.cached,
        "n_val": len(m.val),
        "n_test": n,
        "train_seconds": m.train_seconds,
    }
    return {
        "name": name,
        "info": info,
        "alpha": alpha,
        "risk": RISK,
        "bound": BOUND,
        "margin": args.margin,
        "val_accuracy": val_acc.tolist(),
        "severities": list(severities),
        "champion": {
            "value": champ.value,
            "certified": champ.certified,
            "guarantee": champ.guarantee,
            "answer_rule": static_rule.to_dict(),
            "n_fit": champ.n_fit,
            "n_calibrate": champ.n_calibrate,
        },
        "atc": atc.to_dict(),
        "folds": [int(a.size), int(b.size)],
        "condition_order": list(conditions),
        "conditions": conditions,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# goals and the report
# ---------------------------------------------------------------------------------------------
def _pct(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"


def _acc_cov(v: dict[str, Any]) -> str:
    acc = v["answered_accuracy"]
    return f"{'—' if not np.isfinite(acc) else f'{acc:.4f}'} / {v['coverage']:.3f}"


def _statuses(v: dict[str, Any]) -> str:
    return "/".join(f["status"] for f in v["folds"])


def table_lines(res: dict[str, Any]) -> list[str]:
    info = res["info"]
    lines = [
        f"### {res['name']}: `{info['data']}` — {info['model']}",
        "",
        f"α = {res['alpha']:.2f} (final-exit validation accuracy {res['val_accuracy'][-1]:.4f} − {res['margin']}, rounded down to "
        f"a point), η = {res['risk']}, {res['bound']}. Champion: {res['champion']['guarantee']} (δ = {res['champion']['value']:.4g}, "
        f"static ρ = {res['champion']['answer_rule']['threshold']:.4g}). Test rows {info['n_test']}, folds {res['folds'][0]} / "
        f"{res['folds'][1]} (recalibrate on one, evaluate on the other, swapped and averaged). Cache `{info['cache_key']}` "
        f"({'read from the cache' if info['cached'] else 'trained in this run'}).",
        "",
        "| condition | final-exit acc. | floor | static shortfall | label-free shortfall | labelled shortfall | "
        "label-free ans. acc. / coverage | labelled ans. acc. / coverage | ATC final est. / meas. (abs. err.) | detection delay | "
        "label-free / labelled status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cond, c in res["conditions"].items():
        d = c["detection"]
        delay = f"{d['delay']}" if d["delay"] is not None else f"none in {d['streamed']}"
        if cond == "clean":
            delay = ("false alarm at " + delay) if d["delay"] is not None else f"no false alarm in {d['streamed']}"
        lines.append(
            f"| {cond} | {c['final_accuracy']:.4f} | {c['floor']:.4f} | {c['static']['shortfall']:.4f} | {c['label_free']['shortfall']:.4f} | "
            f"{c['labelled']['shortfall']:.4f} | {_acc_cov(c['label_free'])} | {_acc_cov(c['labelled'])} | "
            f"{c['atc_estimate'][-1]:.4f} / {c['atc_measured'][-1]:.4f} ({c['atc_error_final']:.4f}) | {delay} | "
            f"{_statuses(c['label_free'])} · {_statuses(c['labelled'])} |"
        )
    lines.append("")
    return lines


def _answered_reason(version: str, c: dict[str, Any]) -> str:
    v = c[version]
    folds = v["folds"]
    if version == "label_free":
        st = [f["status"] for f in folds]
        if all(s != "label_free" for s in st):
            return f"the refit was refused on both folds (agreement gate), so the champion (static ρ = {c['static_rho']:g}) answers everything"
        sign = c["atc_signed_error_final"]
        est = f"its maps estimated {v['answered_accuracy_estimated']:.4f} on the answered rows, measured {v['answered_accuracy']:.4f}"
        if "refused" in st:
            est = (
                f"the refit was refused on one fold (agreement gate), where the champion (static ρ = {c['static_rho']:g}) answers "
                f"everything below α; pooled over both folds {est}"
            )
        if (
            np.isfinite(v["answered_accuracy_estimated"])
            and v["answered_accuracy_estimated"] < c["alpha"] - ANSWERED_SLACK
        ):
            return (
                f"{est}: even by its own estimate no ρ reaches α on these rows, and the label-free rule then serves the most "
                "selective grid value (it has no 'decline all' outcome)"
            )
        if sign > 0.01:
            return (
                f"{est}: ATC over-estimates the final exit by {100 * sign:.1f} points (the network stays confident on these inputs), "
                "so the levelled maps and ρ are too optimistic"
            )
        level = (
            f"ATC's level is close (error {100 * sign:+.1f} points)"
            if sign >= -0.01
            else f"ATC even under-estimates the final exit ({100 * sign:+.1f} points)"
        )
        return (
            f"{est}; {level}, but one logit shift keeps the validation *ranking* of the "
            "final exit's map, which under this shift no longer separates right from wrong rows as it did, so the rows kept "
            "above ρ are not as accurate as their map values say"
        )
    st = [f["status"] for f in folds]
    if any(s in ("not_certified", "too_few_labels") for s in st):
        from pcee.operating_point import best_possible_accuracy

        n_hold = [f["n_holdout"] for f in folds if f["status"] == "not_certified"]
        small = [h for h in n_hold if h and best_possible_accuracy(h, RISK, BOUND) < c["alpha"] + 0.03]
        extra = (
            f"; with {'/'.join(map(str, small))} held-out rows even zero errors certify at most "
            f"{'/'.join(f'{best_possible_accuracy(h, RISK, BOUND):.3f}' for h in small)} at η = {RISK}"
            if small
            else ""
        )
        return (
            f"recalibrate returned {'/'.join(st)}: a refit that is not accepted is not served, so the champion (static ρ = "
            f"{c['static_rho']:g}) keeps answering everything, below α{extra}"
        )
    n_hold = [f["n_holdout"] for f in folds]
    return f"certified on {'/'.join(map(str, n_hold))} held-out rows; the evaluation fold falls below (a miss the η = {RISK} risk allows, or sampling noise of the few answered rows)"


def goals(results: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    out: list[str] = []
    summary: dict[str, Any] = {}
    for res in results:
        name, alpha, conds = res["name"], res["alpha"], res["conditions"]
        g: dict[str, Any] = {}
        out.append(f"**{name}** (α = {alpha:.2f})")
        out.append("")
        # 1. accuracy on answered >= α − 1 point, every condition
        for version, label in (("label_free", "label-free"), ("labelled", "labelled")):
            fails, vacuous, worst = [], [], None
            for cond, c in conds.items():
                v = c[version]
                acc = v["answered_accuracy"]
                if v["n_answered"] == 0:
                    vacuous.append(cond)
                    continue
                worst = acc if worst is None else min(worst, acc)
                if acc < alpha - ANSWERED_SLACK - 1e-12:
                    fails.append(cond)
            ok = not fails
            g[f"answered_accuracy_{version}"] = {"pass": ok, "fails": fails, "vacuous": vacuous, "worst": worst}
            covs = ", ".join(f"{cond} {c[version]['coverage']:.2f}" for cond, c in conds.items())
            out.append(
                f"- {'PASS' if ok else 'FAIL'} — accuracy on answered >= α − 1 point = {alpha - ANSWERED_SLACK:.2f} in every "
                f"condition, {label}: worst {worst if worst is None else f'{worst:.4f}'}"
                + (f"; nothing answered (vacuous pass) in {', '.join(vacuous)}" if vacuous else "")
                + f". Coverage that cost: {covs}."
            )
            for cond in fails:
                c = conds[cond]
                out.append(
                    f"  - {cond}: {c[version]['answered_accuracy']:.4f} at coverage {c[version]['coverage']:.3f} — likely why: "
                    + _answered_reason(version, c)
                    + "."
                )
        # 2. the label-free refit removes >= half of the static shortfall above the floor
        rows, fails = [], []
        for cond, c in conds.items():
            st, lf, fl = c["static"]["shortfall"], c["label_free"]["shortfall"], c["floor"]
            if st > fl + 1e-9:
                need = LF_SHARE * (st - fl)
                ok = (st - lf) >= need - 1e-12
                rows.append(cond)
                if not ok:
                    fails.append(cond)
        ok = not fails
        removed = [
            (conds[k]["static"]["shortfall"] - conds[k]["label_free"]["shortfall"])
            / (conds[k]["static"]["shortfall"] - conds[k]["floor"])
            for k in rows
        ]
        g["label_free_halves_gap"] = {
            "pass": ok,
            "applies": rows,
            "fails": fails,
            "share_removed": dict(zip(rows, removed, strict=True)),
        }
        detail = (
            ", ".join(f"{k} {100 * r:.0f}%" for k, r in zip(rows, removed, strict=True))
            or "no condition has static > floor"
        )
        out.append(
            f"- {'PASS' if ok else 'FAIL'} — label-free (0 labels) removes >= {100 * LF_SHARE:.0f}% of (static − floor) "
            f"wherever static > floor ({len(rows) - len(fails)}/{len(rows)} conditions): share removed {detail}."
        )
        worse = [
            k
            for k, c in conds.items()
            if c["static"]["shortfall"] <= c["floor"] + 1e-9
            and c["label_free"]["shortfall"] > c["static"]["shortfall"] + 1e-9
        ]
        g["label_free_halves_gap"]["worse_where_static_below_floor"] = worse
        if worse:
            out.append(
                "  - not judged, but shown: where static <= floor (the early exits beat the final exit on these inputs) the "
                "label-free refit *raised* the shortfall in "
                + ", ".join(
                    f"{k} ({conds[k]['static']['shortfall']:.4f} → {conds[k]['label_free']['shortfall']:.4f}, floor "
                    f"{conds[k]['floor']:.4f})"
                    for k in worse
                )
                + ": its estimated maps credit an early exit only where it agrees with the final exit, so rows move to the "
                "final exit, which is the worse exit here."
            )
        for cond in fails:
            c = conds[cond]
            st = "/".join(f["status"] for f in c["label_free"]["folds"])
            why = (
                f"static {c['static']['shortfall']:.4f} → label-free {c['label_free']['shortfall']:.4f} vs floor {c['floor']:.4f}; "
                f"refit {st}"
            )
            if all(f["status"] != "label_free" for f in c["label_free"]["folds"]):
                why += " (the agreement gate refused it: the champion stays)"
            elif c["atc_signed_error_final"] > 0.01:
                why += (
                    f"; ATC over-estimates the final exit by {100 * c['atc_signed_error_final']:.1f} points, so the estimated maps "
                    "still let too many rows leave early"
                )
            else:
                why += (
                    "; the estimated maps move δ = α and the level only: early exits whose agreement with the final exit stays high "
                    "but whose own accuracy fell still answer"
                )
            out.append(f"  - {cond}: {why}.")
        # 3. clean coverage >= 0.98 where the clean target is met
        clean = conds.get("clean")
        if clean is not None:
            parts, fails, applies = [], [], []
            for version in VERSIONS:
                v = clean[version]
                met = v["accuracy"] >= alpha - 1e-12
                parts.append(
                    f"{version} coverage {v['coverage']:.3f} (accuracy {v['accuracy']:.4f}, {'meets' if met else 'misses'} α)"
                )
                if met:
                    applies.append(version)
                    if v["coverage"] < CLEAN_COVERAGE - 1e-12:
                        fails.append(version)
            ok = not fails
            g["clean_coverage"] = {
                "pass": ok,
                "applies": applies,
                "fails": fails,
                "coverage": {v: clean[v]["coverage"] for v in VERSIONS},
            }
            out.append(
                f"- {'PASS' if ok else 'FAIL'} — clean coverage >= {CLEAN_COVERAGE} where the clean target is met: "
                + "; ".join(parts)
                + "."
            )
            for version in fails:
                v = clean[version]
                rho = [f.get("rho") for f in v.get("folds", [])] or [clean["static_rho"]]
                zero = v["declined_zero_map_value"]
                why = (
                    f"{v['declined']} of {v['n']} clean rows declined, {zero} of them with map value 0 at their exit (a bin with "
                    "fewer than min_count fitting rows, which PCEE maps to accuracy 0), so any ρ > 0 declines them"
                    if zero
                    else f"{v['declined']} of {v['n']} clean rows have map values below ρ"
                )
                kind = (
                    "the label-free ρ is the lowest grid value whose estimated answered accuracy meets α, a point estimate on "
                    "≤ 30% of the shadow rows"
                    if version == "label_free"
                    else "the fold whose δ did not certify on the held-out rows serves a certified ρ instead (status selective)"
                    if version == "labelled"
                    else "the champion's ρ"
                )
                out.append(f"  - {version}: ρ per fold {rho}; likely why: {why}; {kind}.")
        # 4. mean |ATC error| <= 3 points
        errs = {k: c["atc_error_final"] for k, c in conds.items()}
        mean_err = float(np.mean(list(errs.values())))
        shifted = [k for k in errs if k != "clean"]
        mean_shift = float(np.mean([errs[k] for k in shifted])) if shifted else float("nan")
        ok = mean_err <= ATC_GOAL + 1e-12
        g["atc_error"] = {
            "pass": ok,
            "mean_abs_error_final": mean_err,
            "mean_abs_error_shifted": mean_shift,
            "per_condition": errs,
        }
        out.append(
            f"- {'PASS' if ok else 'FAIL'} — mean |ATC error| of the final exit <= {100 * ATC_GOAL:.0f} points: "
            f"{_pct(mean_err)} points over all {len(errs)} conditions ({_pct(mean_shift)} over the shifted ones)."
        )
        bad = sorted((k for k in errs if errs[k] > ATC_GOAL), key=lambda k: -errs[k])
        for k in bad:
            s = conds[k]["atc_signed_error_final"]
            if k == "class_prior":
                why = (
                    "ATC's threshold is set on the validation "
                    "class mix; the over-represented classes have their own confidence–accuracy relation (label shift breaks ATC's "
                    "assumption that this relation carries over)"
                )
            elif s > 0:
                why = (
                    "over-estimates: confidence stays high while accuracy falls (the network grows overconfident "
                    "on these inputs, the failure ATC is known for under noise-, blur- and resolution-type corruptions)"
                )
            else:
                why = (
                    "under-estimates: confidence (entropy) drops more than accuracy on these inputs, so fewer "
                    "rows clear the validation threshold than are right"
                )
            out.append(f"  - {k}: error {_pct(errs[k])} points (mean signed error {100 * s:+.1f}); {why}.")
        # detection (reported, not a goal)
        det = {k: c["detection"]["delay"] for k, c in conds.items()}
        out.append(
            "- detection delay (reported, no goal): "
            + ", ".join(f"{k} {'none' if d is None else d}" for k, d in det.items() if k != "clean")
            + f"; clean stream: {'no false alarm' if det.get('clean') is None else 'false alarm after ' + str(det['clean']) + ' rows'}."
        )
        out.append("")
        summary[name] = g
    return out, summary


def figure(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    from pcee.plots import _save

    ncol = len(results)
    fig, axes = plt.subplots(2, ncol, figsize=(7.5 * ncol, 8), squeeze=False)
    for j, res in enumerate(results):
        conds = list(res["conditions"])
        x = np.arange(len(conds))
        ax = axes[0, j]
        for i, (key, label) in enumerate(
            (
                ("static", "static"),
                ("label_free", "label-free (0 labels)"),
                ("labelled", "labelled"),
                ("floor", "floor (final exit)"),
            )
        ):
            vals = [
                res["conditions"][c]["floor"] if key == "floor" else res["conditions"][c][key]["shortfall"]
                for c in conds
            ]
            ax.bar(x + (i - 1.5) * 0.2, vals, 0.2, label=label)
        ax.set(
            xticks=x,
            ylabel=f"shortfall max(0, α − acc.), α = {res['alpha']:.2f}",
            title=f"{res['name']}: shortfall (all answered)",
        )
        ax.set_xticklabels(conds, rotation=45, ha="right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        for key, marker, label in (("label_free", "o", "label-free"), ("labelled", "^", "labelled")):
            cov = [res["conditions"][c][key]["coverage"] for c in conds]
            acc = [res["conditions"][c][key]["answered_accuracy"] for c in conds]
            ax.scatter(cov, acc, marker=marker, label=label)
            for c, xv, yv in zip(conds, cov, acc, strict=True):
                if np.isfinite(yv):
                    ax.annotate(c, (xv, yv), fontsize=5, alpha=0.7)
        ax.axhline(res["alpha"] - ANSWERED_SLACK, color="k", ls="--", lw=1, label="α − 1 point")
        ax.set(
            xlabel="coverage (answered share)",
            ylabel="accuracy on answered",
            title=f"{res['name']}: abstain mode",
            xlim=(-0.02, 1.02),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: digits only (3-epoch model), severity 3, short streams"
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        choices=("digits", "cifar10"),
        default=None,
        help="default: digits cifar10 (--quick: digits)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the folds, corruption noise, prior classes and streams (models: seed 0)",
    )
    p.add_argument("--max-labels", type=int, default=500, help="labelled recalibration rows per fold")
    p.add_argument(
        "--shadow-rows", type=int, default=500, help="unlabelled shadow rows per fold for the label-free refit"
    )
    p.add_argument(
        "--stream-rows",
        type=int,
        default=None,
        help="most shifted rows streamed to the monitor (default 1000; --quick 200)",
    )
    p.add_argument("--margin", type=float, default=0.05, help="α = floor((final-exit val accuracy − margin)·100)/100")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    p.add_argument("--report-dir", type=Path, default=REPO / "reports")
    args = p.parse_args(argv)
    if args.max_labels < 1 or args.shadow_rows < 1:
        p.error("--max-labels and --shadow-rows must be >= 1")
    args.stream_rows = args.stream_rows or (200 if args.quick else 1000)
    names = args.datasets or (["digits"] if args.quick else ["digits", "cifar10"])
    severities = QUICK_SEVERITIES if args.quick else SEVERITIES
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(max(1, int(args.threads)))
    results, skipped = [], []
    for name in names:
        if name == "cifar10" and not Path(_ec().CIFAR10).is_dir():
            skipped.append(f"cifar10: no data at {_ec().CIFAR10} (relative to {os.getcwd()}); not run")
            progress(skipped[-1])
            continue
        results.append(run_dataset(name, args, severities))
    if not results:
        print("no dataset could be run: " + "; ".join(skipped), file=sys.stderr)
        return 1
    goal_lines, summary = goals(results)
    out_dir = Path(args.report_dir)
    fig_path = figure(results, out_dir / "figures" / "shift_control.png")
    seconds = time.perf_counter() - t0
    scale = "quick" if args.quick else "default"
    command = " ".join(
        ["uv run --locked python benchmarks/shift_control.py", *(argv if argv is not None else sys.argv[1:])]
    )
    body = [
        "# Shift control: static vs label-free vs labelled recalibration under corruption and prior shift",
        "",
        f"_Reproduce: `{command}` (scale **{scale}**, seed {args.seed}; wall time {seconds:.0f} s, training included unless the "
        "models came from the cache)._",
        "",
        f"Per condition the test rows are split (seeded) into two folds, the same rows for every condition (the class-prior "
        f"rows are resampled within each fold); one fold recalibrates — the **label-free** refit on the all-exit logits of up "
        f"to {args.shadow_rows} of its rows (no labels), the **labelled** refit (`recalibrate`, certificate at α, η = {RISK}, "
        f"{BOUND}) on up to {args.max_labels} of its labelled rows — and the other evaluates; then the folds swap and the two "
        "are averaged. **Shortfall** = max(0, α − accuracy) with every request answered (mean of the two folds); **floor** = "
        "the final exit's shortfall. **ans. acc. / coverage**: accuracy on answered requests and answered share under "
        "`abstain` (answered = expected accuracy at the answering exit >= the version's ρ), pooled over both folds (— = nothing "
        "answered). A version that is not accepted (label-free refused, labelled not accepted) serves the champion and its static "
        "ρ. **ATC**: estimated vs measured final-exit accuracy on the evaluation fold (means over the two folds; abs. err. = mean over the folds of |estimate − measured|). **Detection delay**: shifted rows sent "
        f"before the drift monitor's first alarm ({CLEAN_PREFIX} clean rows first, checks every {CHUNK} rows on the last "
        f"{WINDOW}; none = no alarm in the rows streamed). Class prior: {PRIOR_CLASSES} seeded classes make "
        f"{100 * PRIOR_SHARE:.0f}% of the traffic. Severities: {', '.join(map(str, severities))}.",
        "",
    ]
    for res in results:
        body += table_lines(res)
    body += ["## Goals", ""] + goal_lines
    body += [f"![shortfall and selective accuracy per condition]({os.path.relpath(fig_path, out_dir)})", ""]
    if skipped:
        body += ["Not run: " + "; ".join(skipped), ""]
    text = "\n".join(body) + "\n"
    payload = {
        "command": command,
        "scale": scale,
        "seed": args.seed,
        "risk": RISK,
        "bound": BOUND,
        "policy": POLICY,
        "max_labels": args.max_labels,
        "shadow_rows": args.shadow_rows,
        "stream_rows": args.stream_rows,
        "margin": args.margin,
        "severities": list(severities),
        "goals": summary,
        "wall_seconds": seconds,
        "skipped": skipped,
        "datasets": results,
    }
    write_text_atomic(
        out_dir / "shift_control.json",
        json.dumps(to_jsonable(payload, nonfinite_as_null=True), indent=2, sort_keys=True) + "\n",
    )
    write_text_atomic(out_dir / "shift_control.md", text)
    print(text, flush=True)
    progress(f"wrote {out_dir / 'shift_control.md'}, .json and {fig_path} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

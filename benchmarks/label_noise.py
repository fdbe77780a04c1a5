#!/usr/bin/env python
"""Label noise and the labelled refit: how far wrong feedback labels move its accuracy and its certificate.

    uv run python benchmarks/label_noise.py [--quick] [--conditions clean gaussian_noise/3 ...] [--max-labels 500]

The digits model of ``benchmarks/shift_control.py`` (the evidence cache, trained there when missing),
its champion chosen on validation (PCEE, certified at α = final-exit validation accuracy − margin,
η = 0.1, Clopper–Pearson). For each traffic condition the test split is cut into two folds; the refit
(:func:`pcee.recalibration.recalibrate`, with the champion's certificate) reads ``--max-labels`` rows of
one fold with their labels, and the version it serves is evaluated on the other fold with the true
labels (swapped and averaged). The labels the refit reads are:

- ``honest``: the true labels;
- ``uniform p``: a share p of the rows relabelled with a uniformly drawn wrong class;
- ``adversarial p``: a share p of the rows relabelled with the served answer where it is wrong ("always
  the served prediction", which makes the model look right); where fewer served answers are wrong, all.

Columns: the refit's status, its certificate (the accuracy lower bound on its held-out rows, the
number it promises), the accuracy on answered requests of the other fold (true labels: a check),
the coverage, how far each moved from the honest run, and whether :func:`pcee.recalibration.
label_agreement_check` flagged the labels (sign test at 0.01). Every figure is a mean over the two folds.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.evidence import evidence_common as ec  # noqa: E402
from benchmarks.shift_control import BOUND, POLICY, RISK, data_scale, pooled  # noqa: E402

NOISES = (("honest", 0.0), ("uniform", 0.05), ("uniform", 0.2), ("adversarial", 0.05), ("adversarial", 0.2))


def noisy_labels(labels: np.ndarray, served: np.ndarray, kind: str, share: float, k: int, rng) -> np.ndarray:
    """``labels`` with ``share`` of the rows made wrong, ``kind`` uniform or adversarial (see the module doc)."""
    out = labels.copy()
    n = int(round(share * labels.size))
    if kind == "uniform" and n:
        rows = rng.choice(labels.size, size=n, replace=False)
        out[rows] = (labels[rows] + rng.integers(1, k, size=n)) % k
    elif kind == "adversarial" and n:
        wrong = np.flatnonzero(served != labels)
        rows = rng.choice(wrong, size=min(n, wrong.size), replace=False)
        out[rows] = served[rows]
    return out


def run_condition(out, folds, champ, static_rule, alpha: float, args) -> dict[tuple[str, float], dict[str, Any]]:
    from pcee.recalibration import recalibrate
    from pcee.selective import AnswerRule

    k = int(out.logits.shape[-1])
    res: dict[tuple[str, float], dict[str, Any]] = {}
    for kind, share in NOISES:
        per_fold, lower, status, flagged, changed = [], [], [], [], []
        for f, (rec, ev) in enumerate(folds):
            r_out, e_out = out.subset(rec[: args.max_labels]), out.subset(ev)
            exits = champ.policy.decide(r_out.logits)
            served = r_out.logits[np.arange(exits.size), exits].argmax(-1)
            rng = np.random.default_rng([args.seed, f, int(share * 100), 0 if kind == "uniform" else 1])
            labels = noisy_labels(r_out.labels, served, kind, share, k, rng)
            rc = recalibrate(
                champ.policy, r_out.logits, labels, flops=out.flops, target_accuracy=alpha, risk=RISK, bound=BOUND
            )
            pol, rule = (
                (rc.policy, AnswerRule.from_dict(rc.answer_rule)) if rc.accepted else (champ.policy, static_rule)
            )
            per_fold.append(served(pol, rule, e_out))
            # the refit's own bound at the point it chose (its promise), whether or not it certified α
            lower.append(math.nan if rc.accuracy_lower_bound is None else rc.accuracy_lower_bound)
            status.append(rc.status)
            flagged.append(bool(rc.label_check and rc.label_check["flagged"]))
            changed.append(int((labels != r_out.labels).sum()))
        s = pooled(per_fold, alpha)
        res[(kind, share)] = {
            "answered_accuracy": math.nan if s["answered_accuracy"] is None else s["answered_accuracy"],
            "coverage": s["coverage"],
            "lower_bound": float(np.nanmean(lower)) if not np.isnan(lower).all() else math.nan,
            "status": "/".join(status),
            "flagged": sum(flagged),
            "changed": int(np.mean(changed)),
        }
    return res


def main() -> int:
    from pcee.data.corruptions import corrupt
    from pcee.data.datasets import ArraySplit
    from pcee.operating_point import choose_operating_point
    from pcee.selective import AnswerRule
    from pcee.training.evaluate import compute_outputs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the evidence --quick model (3 epochs) and two conditions")
    ap.add_argument("--conditions", nargs="+", default=None, help="clean and/or corruption/severity names")
    ap.add_argument("--max-labels", type=int, default=500, help="labelled rows the refit reads per fold")
    ap.add_argument(
        "--margin",
        type=float,
        default=0.07,
        help="α = final-exit validation accuracy − margin (0.07: a digits fold's ~54 held-out rows can certify it)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    conditions = args.conditions or (
        ["clean", "gaussian_noise/3"]
        if args.quick
        else ["clean", "gaussian_noise/3", "brightness/3", "gaussian_noise/5"]
    )
    t0 = time.perf_counter()
    scale = data_scale("digits", args.quick)
    m = ec.trained(scale, "mixed")
    splits = ec.load_splits(scale)
    alpha = float(math.floor((float(ec.correct_matrix(m.val).mean(axis=0)[-1]) - args.margin) * 100 + 1e-9) / 100)
    champ = choose_operating_point(POLICY, m.val, target_accuracy=alpha, risk=RISK, bound=BOUND, seed=args.seed)
    static_rule = AnswerRule.from_dict(champ.answer_rule)
    order = np.random.default_rng([args.seed, 11]).permutation(len(m.test))
    a, b = order[: len(order) // 2], order[len(order) // 2 :]
    model = m.model()
    print(
        f"digits {scale['model']} ({scale['epochs']} epochs, cache {m.path.name}); α = {alpha:.2f}, η = {RISK}, {BOUND}; "
        f"refit on {min(args.max_labels, a.size)} labelled rows per fold, evaluated on the other fold (test rows, true labels: "
        "a check)\n"
    )
    print(
        "| condition | labels | rows changed | refit status (fold 1/2) | certificate (lower bound) | Δ certificate "
        "| answered accuracy (check) | Δ answered accuracy | coverage | check flagged (of 2) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cond in conditions:
        if cond == "clean":
            out = m.test
        else:
            corruption, sev = cond.split("/")
            xc = corrupt(splits.test.x, corruption, int(sev), seed=args.seed)
            out = compute_outputs(
                model, ArraySplit(np.ascontiguousarray(xc, dtype=np.float32), splits.test.y), m.test.flops
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = run_condition(out, [(a, b), (b, a)], champ, static_rule, alpha, args)
        honest = res[("honest", 0.0)]
        for (kind, share), r in res.items():
            d_lb = r["lower_bound"] - honest["lower_bound"]
            d_acc = r["answered_accuracy"] - honest["answered_accuracy"]
            print(
                f"| {cond} | {kind} {share:.0%} | {r['changed']} | {r['status']} | {r['lower_bound']:.4f} | {d_lb:+.4f} "
                f"| {r['answered_accuracy']:.4f} | {d_acc:+.4f} | {r['coverage']:.3f} | {r['flagged']} |"
            )
    print(
        f"\n({time.perf_counter() - t0:.0f} s.) The certificate is the refit's (1 − η) lower bound at the point it chose, on its "
        "own held-out rows, which carry the same wrong labels; the answered accuracy is measured on the other fold with "
        "the true labels. An adversarial client can only change the rows whose served answer is wrong, so 'adversarial p' "
        "changes min(p, served error rate) of the rows."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

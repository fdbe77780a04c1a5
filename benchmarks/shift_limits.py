"""What limits goal 2 of benchmarks/shift_control.py: the label count, the certificate, or the ranking?

Goal 2 asks a certificate with <= 150 labels to reach 0.8x the *oracle coverage*: the largest share of
the evaluation rows whose accuracy is >= α when answered in the version's order (its expected accuracy
at the answering exit). At the oracle coverage the accuracy on answered is α itself, so a certificate
needs a share whose accuracy clears α by its own margin of error; how much share that leaves depends on
how steeply accuracy rises up the ranking. Three measurements per condition and fold, analysis only
(nothing here chooses what is served):

- **ideal @n** (:func:`ideal_coverage`): the largest evaluation share, in a ranking, that an *ideal*
  label-only certificate certifies in the median case: all n labels drawn from exactly that answered
  set (no label wasted on declined rows), the candidate known in advance (no fixed sequence, no looks),
  the whole η; its Clopper-Pearson bound at the median count (``floor(n·accuracy)`` right) must reach α.
  No certificate built from n labels alone does better in the median case.
- **other rankings** (:func:`rankings`): the same answering exit and prediction, ranked instead by the
  probability a *later* exit gives that prediction: the next exit's (one more segment per early answer)
  or the final exit's (the whole network per request). :func:`pcee.few_labels.certify_few_labels`
  unchanged (its looks, η shares and skip) in that ranking; its coverage is compared with the issue's
  oracle (the version's order) and with the ranking's own oracle.
- **PPI multiplier** (:func:`ppi_label_multiplier`): prediction-powered inference estimates the
  accuracy on answered from the unlabelled rows' predicted correctness plus a labelled correction; its
  variance is the labels-only one times 1 − r², r the correlation between correct and the predictor on
  the answered rows. The best predictor here is the final exit's probability of the answered class;
  1 / (1 − r²) is how many labels each label is worth to PPI at the oracle's 0.8x share.

numpy and scipy; the policies' own ``decide`` and ``expected_accuracy``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from pcee.calibration.scores import softmax
from pcee.few_labels import certify_few_labels
from pcee.selective import expected_at_exit

#: the rankings compared; "version" is what pcee serves
RANKINGS = ("version", "next exit", "final exit")


def rankings(policy: Any, logits: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per ranking, the score of each row; plus (exit, prediction) of the answering exit. logits (N, L, K)."""
    logits = np.asarray(logits)
    exits, expected = expected_at_exit(policy, logits)
    rows = np.arange(exits.size)
    probs = softmax(logits)  # (N, L, K)
    pred = probs[rows, exits].argmax(-1)
    later = np.minimum(exits + 1, logits.shape[1] - 1)
    scores = {
        "version": expected,
        "next exit": probs[rows, later, pred],
        "final exit": probs[rows, -1, pred],
    }
    return scores, exits, pred


def _shares_and_accuracy(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share answered, accuracy on answered) at every distinct threshold, ties answered together."""
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    return (ends + 1) / s.size, np.cumsum(c)[ends] / (ends + 1)


def median_case_passes(accuracy: np.ndarray, n: int, alpha: float, risk: float) -> np.ndarray:
    """Whether n labels from a set of this accuracy certify α at their median count (Clopper-Pearson)."""
    right = np.floor(np.asarray(accuracy, dtype=np.float64) * n + 1e-9)
    with np.errstate(invalid="ignore"):
        lower = np.where(right > 0, stats.beta.ppf(risk, right, n - right + 1), 0.0)
    return lower >= alpha - 1e-12


def ideal_coverage(scores: np.ndarray, correct: np.ndarray, alpha: float, n: int, risk: float) -> float:
    """The largest share an ideal label-only certificate with ``n`` labels reaches (module doc)."""
    if n < 1 or scores.size == 0:
        return 0.0
    share, accuracy = _shares_and_accuracy(np.asarray(scores, dtype=np.float64), np.asarray(correct, bool))
    ok = median_case_passes(accuracy, n, alpha, risk)
    return float(share[ok].max()) if ok.any() else 0.0


def ppi_label_multiplier(scores: np.ndarray, correct: np.ndarray, predictor: np.ndarray, share: float) -> float | None:
    """1 / (1 − r²) on the top ``share`` of rows in ``scores``' order (None when r is undefined)."""
    k = int(round(share * scores.size))
    if k < 3:
        return None
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    c, p = np.asarray(correct, np.float64)[top], np.asarray(predictor, np.float64)[top]
    if c.std() == 0 or p.std() == 0:
        return None
    r = float(np.corrcoef(c, p)[0, 1])
    return 1.0 / max(1e-9, 1.0 - r * r)


def oracle_coverage(scores: np.ndarray, correct: np.ndarray, alpha: float) -> float:
    """The largest share answered in ``scores``' order whose accuracy is >= α (labels known; ties answer together):
    the *oracle coverage* of benchmarks/shift_control.py."""
    share, accuracy = _shares_and_accuracy(np.asarray(scores, dtype=np.float64), np.asarray(correct, bool))
    ok = accuracy >= alpha - 1e-12
    return float(share[ok].max()) if ok.any() else 0.0


def limits_fold(
    policy: Any,
    lab_logits: np.ndarray,
    lab_labels: np.ndarray,
    ev_logits: np.ndarray,
    ev_labels: np.ndarray,
    alpha: float,
    risk: float,
    bound: str,
    budget: int,
) -> dict[str, Any]:
    """One fold: per ranking the ideal coverage, the certificate's coverage and accuracy, its own oracle."""
    lab, _, lab_pred = rankings(policy, lab_logits)
    ev, _, ev_pred = rankings(policy, ev_logits)
    c_l, c_e = lab_pred == np.asarray(lab_labels), ev_pred == np.asarray(ev_labels)
    n = min(int(budget), c_l.size)
    oracle = oracle_coverage(ev["version"], c_e, alpha)
    out: dict[str, Any] = {"labels": n, "oracle": oracle, "rankings": {}}
    for name in RANKINGS:
        rule = certify_few_labels(lab[name][:n], c_l[:n], alpha, risk, bound, budget=n).rule
        answered = np.zeros(c_e.size, bool) if rule is None else rule.answered(ev[name])
        out["rankings"][name] = {
            "ideal": ideal_coverage(ev[name], c_e, alpha, n, risk),
            "certified": float(answered.mean()),
            "answered": int(answered.sum()),
            "answered_correct": int(c_e[answered].sum()),
            "own_oracle": oracle_coverage(ev[name], c_e, alpha),
        }
    out["ppi_multiplier"] = ppi_label_multiplier(ev["version"], c_e, ev["final exit"], 0.8 * oracle)
    return out


def pool_limits(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """Shares averaged over the folds (as the oracle is), accuracy on answered pooled over their rows."""
    out: dict[str, Any] = {
        "labels": min(f["labels"] for f in per_fold),
        "oracle": float(np.mean([f["oracle"] for f in per_fold])),
        "rankings": {},
    }
    for name in RANKINGS:
        folds = [f["rankings"][name] for f in per_fold]
        ans = sum(f["answered"] for f in folds)
        out["rankings"][name] = {
            key: float(np.mean([f[key] for f in folds])) for key in ("ideal", "certified", "own_oracle")
        } | {"answered_accuracy": (sum(f["answered_correct"] for f in folds) / ans) if ans else None}
    multipliers = [f["ppi_multiplier"] for f in per_fold if f["ppi_multiplier"] is not None]
    out["ppi_multiplier"] = float(np.mean(multipliers)) if multipliers else None
    return out


def _ratio(value: float, oracle: float) -> str:
    return f"{value:.3f} ({value / oracle:.2f}x)" if oracle > 0 else f"{value:.3f}"


def limits_lines(results: list[dict[str, Any]], oracle_min: float, ratio: float) -> tuple[list[str], dict[str, Any]]:
    """The section's table (conditions judged by goal 2) and the counts per ranking."""
    lines = [
        "| condition | oracle (version's order) | certified @150, version's ranking | ideal @150, version's ranking | "
        "certified @150, next exit's ranking (own oracle) | certified @150, final exit's ranking (own oracle) | "
        "ideal @150, final exit's ranking | PPI label multiplier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    counts = {f"{kind} {name}": 0 for name in RANKINGS for kind in ("certified", "ideal")}
    judged = 0
    for res in results:
        for cond, c in res["conditions"].items():
            lim = c["limits"]
            oracle = lim["oracle"]
            if oracle < oracle_min - 1e-12:
                continue
            judged += 1
            r = lim["rankings"]
            for name in RANKINGS:
                for kind in ("certified", "ideal"):
                    counts[f"{kind} {name}"] += r[name][kind] >= ratio * oracle - 1e-12
            mult = lim["ppi_multiplier"]
            lines.append(
                f"| {res['name']}/{cond} | {oracle:.3f} | {_ratio(r['version']['certified'], oracle)} | "
                f"{_ratio(r['version']['ideal'], oracle)} | {_ratio(r['next exit']['certified'], oracle)} "
                f"[{r['next exit']['own_oracle']:.3f}] | {_ratio(r['final exit']['certified'], oracle)} "
                f"[{r['final exit']['own_oracle']:.3f}] | {_ratio(r['final exit']['ideal'], oracle)} | "
                f"{'—' if mult is None else f'{mult:.2f}'} |"
            )
    return [*lines, ""], {"judged": judged, "counts": counts}

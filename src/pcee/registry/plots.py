"""The plots a pipeline run logs to MLflow (PNG, plus the sweep table as CSV).

Drawn from the sweep rows and the test outputs only, so they need no other module.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _fig():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_pipeline_plots(sweeps: list[dict], policy, val, test, out_dir: Path) -> list[Path]:
    """accuracy_vs_cost.png, achieved_vs_delta.png, reliability.png, exit_histogram.png, sweep.csv."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _fig()
    written = []

    rows = [r for s in sweeps for r in s["rows"]]
    with open(out_dir / "sweep.csv", "w", newline="") as fh:
        keys = [k for k in ("policy", "delta", "accuracy", "mean_flops", "relative_cost", "shortfall") if k in rows[0]]
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    written.append(out_dir / "sweep.csv")

    fig, ax = plt.subplots(figsize=(5, 4))
    for s in sweeps:
        ax.plot([r["relative_cost"] for r in s["rows"]], [r["accuracy"] for r in s["rows"]], ".-", ms=2, label=s["policy"])
    final_acc = float((test.logits[:, -1].argmax(1) == test.labels).mean())
    ax.axhline(final_acc, color="grey", ls=":", label="final exit")
    ax.set(xlabel="cost relative to final exit", ylabel="test accuracy", title="accuracy vs cost")
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "accuracy_vs_cost.png", plt))

    main = sweeps[0]
    fig, ax = plt.subplots(figsize=(5, 4))
    d = np.array([r["delta"] for r in main["rows"]])
    ax.plot(d, [r["accuracy"] for r in main["rows"]], label=f"{main['policy']} achieved")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="target = achieved")
    ax.set(xlabel="δ (accuracy target)", ylabel="test accuracy", xlim=(0, 1), ylim=(0, 1.02), title="performance control")
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "achieved_vs_delta.png", plt))

    # reliability of each exit on the test outputs (max-prob confidence, 15 equal-width bins)
    fig, ax = plt.subplots(figsize=(5, 4))
    probs = np.exp(test.logits - test.logits.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    conf, correct = probs.max(axis=2), probs.argmax(axis=2) == test.labels[:, None]
    edges = np.linspace(0, 1, 16)
    for level in range(test.num_exits):
        b = np.minimum((conf[:, level] * 15).astype(int), 14)
        acc = [correct[b == i, level].mean() if (b == i).any() else np.nan for i in range(15)]
        ax.plot((edges[:-1] + edges[1:]) / 2, acc, "o-", ms=3, label=f"exit {level + 1}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="confidence (max prob)", ylabel="accuracy", title="reliability (test)")
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "reliability.png", plt))

    fig, ax = plt.subplots(figsize=(5, 4))
    exits = policy.decide(test.logits)
    ax.bar(np.arange(1, test.num_exits + 1), np.bincount(exits, minlength=test.num_exits))
    ax.set(xlabel="exit", ylabel="samples", title=f"exit histogram ({policy.name})")
    written.append(_save(fig, out_dir / "exit_histogram.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Plots of the science core (matplotlib, Agg backend, PNG files).

- :func:`plot_reliability`: reliability diagram per exit, bars = the map's accuracy per bin, the
  diagonal, and the bin counts on a second axis;
- :func:`plot_accuracy_vs_cost`: accuracy vs relative cost of every policy, with the oracle;
- :func:`plot_achieved_vs_delta`: achieved accuracy vs δ with the diagonal;
- :func:`plot_exit_histogram`: fraction of samples per exit at one δ.

Each function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pcee.atomic import atomic_file  # noqa: E402
from pcee.sweep import SweepResult  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def plot_reliability(
    maps, path: str | os.PathLike, title: str = "reliability maps (validation)", bar_label: str = "map"
) -> Path:
    """One panel per exit: bars = the map's expected accuracy per bin (as PCEE uses it, so closed
    bins show 0), dots = the raw bin accuracy, the diagonal, and bin counts (grey steps, right axis).

    ``maps`` is a fitted :class:`~pcee.calibration.reliability_map.ExitReliabilityMaps` (or any
    sequence of fitted maps with ``edges_``, ``acc_``, ``counts_``); ``bar_label`` names the bars in
    the legend.
    """
    maps_list = list(getattr(maps, "maps_", maps))
    n = len(maps_list)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols, 3.2 * rows + 0.4), squeeze=False, layout="constrained")
    for level, m in enumerate(maps_list):
        ax = axes[level // cols][level % cols]
        edges, acc, counts = np.asarray(m.edges_), np.asarray(m.acc_), np.asarray(m.counts_)
        raw = np.asarray(getattr(m, "raw_acc_", acc))
        widths = np.diff(edges)
        ax.bar(
            edges[:-1],
            acc,
            width=widths,
            align="edge",
            color="tab:blue",
            alpha=0.6,
            edgecolor="k",
            lw=0.4,
            label=bar_label,
        )
        centres = 0.5 * (edges[:-1] + edges[1:])
        ax.plot(centres[counts > 0], raw[counts > 0], "o", ms=3, color="tab:red", label="bin accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), title=f"exit {level + 1}", xlabel="confidence")
        if level % cols == 0:
            ax.set_ylabel("accuracy")
        twin = ax.twinx()
        twin.step(edges, np.r_[counts, counts[-1]], where="post", color="grey", lw=0.9)
        twin.set_yscale("symlog", linthresh=10)
        twin.tick_params(labelsize=7, colors="grey")
        if level % cols == cols - 1 or level == n - 1:
            twin.set_ylabel("count (grey)", color="grey")
        if level == 0:
            ax.legend(fontsize=7, loc="upper left")
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def plot_accuracy_vs_cost(
    results: Sequence[SweepResult], path: str | os.PathLike, title: str = "accuracy vs cost (test)"
) -> Path:
    """Accuracy against mean FLOPs relative to the final exit, one curve per policy (oracle dashed)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in results:
        order = np.argsort(r.relative_cost, kind="stable")
        style: dict[str, Any] = (
            dict(color="k", ls="--", lw=1.2) if r.policy == "oracle" else dict(lw=1.2, marker=".", ms=3)
        )
        ax.plot(r.relative_cost[order], r.accuracy[order], label=r.policy, **style)
    if results:
        ax.axhline(results[0].final_accuracy, color="grey", ls=":", lw=0.8, label="final exit")
    ax.set(xlabel="mean FLOPs / F_L", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_achieved_vs_delta(
    results: Sequence[SweepResult], path: str | os.PathLike, title: str = "performance control (test)"
) -> Path:
    """Achieved accuracy against the target δ (α for risk-controlled), with the diagonal and the
    final exit's accuracy (δ above it is not achievable)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for r in results:
        ax.plot(r.delta, r.accuracy, lw=1.2, label=f"{r.policy} ({r.param_name})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="achieved = target")
    if results:
        ax.axvline(results[0].final_accuracy, color="grey", ls=":", lw=0.8, label="final-exit accuracy")
    ax.set(xlabel="target δ", ylabel="achieved accuracy", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_exit_histogram(result: SweepResult, delta: float, path: str | os.PathLike) -> Path:
    """Fraction of samples answered at each exit at the sweep value nearest to ``delta``."""
    i = int(np.argmin(np.abs(result.delta - float(delta))))
    hist = result.exit_hist[i]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    levels = np.arange(1, hist.size + 1)
    ax.bar(levels, hist, color="tab:blue")
    for x, h in zip(levels, hist, strict=True):
        ax.annotate(f"{h:.0%}", (x, h), ha="center", va="bottom", fontsize=8)
    ax.set(
        xlabel="exit",
        ylabel="fraction of samples",
        xticks=levels,
        ylim=(0, max(1e-9, hist.max()) * 1.15),
        title=f"{result.policy} at {result.param_name}={result.delta[i]:.3g}: acc {result.accuracy[i]:.3f}, cost {result.relative_cost[i]:.2f}",
    )
    return _save(fig, path)

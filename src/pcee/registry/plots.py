"""The plots a pipeline run logs to MLflow (PNG, plus the sweep table as CSV).

A thin caller of :mod:`pcee.plots` (which draws every plot) and :func:`pcee.sweep.write_rows_csv`:
this module only turns the pipeline's sweep rows and test outputs into their inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pcee import plots
from pcee.calibration.reliability_map import ReliabilityMap
from pcee.calibration.scores import confidence
from pcee.sweep import SweepResult, sweep_exits, write_rows_csv

#: the test reliability diagram's equal-width bins
RELIABILITY_BINS = 15


def write_pipeline_plots(sweeps: list[dict], policy, val, test, out_dir: Path) -> list[Path]:
    """sweep.csv, accuracy_vs_cost.png, achieved_vs_delta.png, reliability.png, exit_histogram.png.

    ``sweeps``: one ``{"policy": name, "rows": SweepResult.to_rows()}`` per policy, the first being
    the served policy's; ``policy``: the served (fitted) policy; ``test``: the test outputs.
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    correct = test.logits.argmax(axis=-1) == test.labels[:, None]  # (N, L)
    final_accuracy = float(correct[:, -1].mean())
    results = [SweepResult.from_rows(s["rows"], test.flops, final_accuracy, policy=s["policy"]) for s in sweeps]
    written = [write_rows_csv(out_dir / "sweep.csv", [r for s in sweeps for r in s["rows"]])]
    written.append(plots.plot_accuracy_vs_cost(results, out_dir / "accuracy_vs_cost.png"))
    written.append(plots.plot_achieved_vs_delta(results[:1], out_dir / "achieved_vs_delta.png"))
    # reliability of each exit on the test outputs: max-prob confidence in equal-width bins
    conf = confidence(test.logits, "max_prob")  # (N, L)
    bins = [
        ReliabilityMap(n_bins=RELIABILITY_BINS, binning="equal_width", min_count=0).fit(
            conf[:, level], correct[:, level]
        )
        for level in range(test.num_exits)
    ]
    written.append(
        plots.plot_reliability(
            bins,
            out_dir / "reliability.png",
            title=f"reliability (test, max prob, {RELIABILITY_BINS} bins)",
            bar_label="test accuracy",
        )
    )
    # where the served policy sends the test samples at its operating point
    value = float(getattr(policy, policy.param_name, np.nan))
    served = sweep_exits(
        policy.name, policy.param_name, np.array([value]), policy.decide(test.logits)[None, :], correct, test.flops
    )
    written.append(plots.plot_exit_histogram(served, value, out_dir / "exit_histogram.png"))
    return written

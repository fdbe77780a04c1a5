"""Calibration tasks: sweep a policy's parameter, fit the chosen policy, build the model bundle,
compute per-exit metrics and plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import get_run_logger, task


def _selected_row(result, rows: list[dict], target: float) -> dict:
    """The sweep row ``select_delta`` picks for the accuracy target."""
    from pcee.sweep import select_delta

    chosen = select_delta(result, target_accuracy=target)
    if isinstance(chosen, dict):
        return chosen
    if isinstance(chosen, (int, np.integer)):
        return rows[int(chosen)]
    value = float(getattr(chosen, "delta", chosen))
    return min(rows, key=lambda r: abs(float(r["delta"]) - value))


@task(name="sweep-policy")
def sweep(policy_name: str, val, test, target_accuracy: float, params: dict | None = None) -> dict:
    """The policy's sweep (fit on val, evaluated on test) and the row chosen for the target."""
    from pcee.sweep import sweep_policy

    result = sweep_policy(policy_name, val, test, **(params or {}))
    rows = result.to_rows()
    chosen = _selected_row(result, rows, target_accuracy)
    get_run_logger().info("%s: chose %s=%.4g (accuracy %.4f, relative cost %.3f)", policy_name, "delta", chosen["delta"], chosen["accuracy"], chosen["relative_cost"])
    return {"policy": policy_name, "rows": rows, "chosen": chosen}


@task(name="fit-policy")
def fit_policy(policy_name: str, params: dict, value: float, val):
    """The policy with its swept parameter set to ``value``, fit on the validation outputs."""
    from pcee.policies.registry import build_policy, get_policy_class

    param = get_policy_class(policy_name).param_name
    policy = build_policy(policy_name, **{**params, param: float(value)})
    return policy.fit(val.logits, val.labels, val.flops)


@task(name="build-bundle")
def build_bundle(model, policy, flops, meta: dict, val, out_dir: str) -> str:
    """Write the ModelBundle (weights, config, policy with maps and δ, FLOPs, reference outputs)."""
    from pcee.bundle import ModelBundle

    bundle = ModelBundle(model, policy, np.asarray(flops, dtype=np.float64), meta)
    try:
        bundle.save(out_dir, reference=val)
    except TypeError:  # a save without the optional reference outputs
        bundle.save(out_dir)
    return out_dir


@task(name="exit-metrics")
def exit_metrics(test) -> dict:
    """Per-exit accuracy, ECE, failure AUROC and FLOPs on the test outputs."""
    from pcee import metrics as M
    from pcee.calibration.scores import confidence

    out: dict[str, float] = {}
    pred = test.logits.argmax(axis=2)
    for level in range(test.num_exits):
        correct = pred[:, level] == test.labels
        conf = confidence(test.logits[:, level, :], "max_prob")
        out[f"exit{level + 1}_accuracy"] = float(correct.mean())
        out[f"exit{level + 1}_ece"] = float(M.expected_calibration_error(conf, correct))
        out[f"exit{level + 1}_auroc"] = float(M.failure_auroc(conf, correct))
        out[f"exit{level + 1}_flops"] = float(test.flops[level])
    return out


@task(name="plots")
def plots(sweeps: list[dict], policy, val, test, out_dir: str) -> str:
    """Accuracy-vs-cost, achieved-vs-δ, reliability diagrams, exit histogram (PNG) into ``out_dir``."""
    from pcee.registry.plots import write_pipeline_plots

    write_pipeline_plots(sweeps, policy, val, test, Path(out_dir))
    return out_dir

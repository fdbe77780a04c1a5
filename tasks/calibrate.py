"""Calibration tasks: the operating point of a policy (chosen on validation only), the model bundle,
per-exit metrics and plots. The choice itself is :func:`pcee.operating_point.choose_operating_point`;
these tasks only run it on the task runner and log what it returned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from pcee.bundle import ModelBundle
from pcee.latency import cost_vector
from pcee.metrics import per_exit_metrics_flat
from pcee.operating_point import choose_operating_point, split_fit_calibrate
from pcee.params import OperatingPointParams
from pcee.registry.plots import write_pipeline_plots
from pcee.sweep import sweep_policy


@task(name="operating-point")
def operating_point(
    policy_name: str,
    val,
    test,
    settings: OperatingPointParams,
    params: dict | None = None,
    latency_profile: dict | None = None,
    cost: str | None = None,
) -> dict:
    """The policy's operating point chosen and certified on ``val`` (fit / calibrate parts); ``test``
    is evaluated afterwards as a check, plus a test curve for the plots (reporting only).

    ``settings``: target_accuracy, risk, bound, mode, calibrate_fraction, seed (``params.yaml``'s section).
    Cost is counted in time where a ``latency_profile`` is given (``cost`` None or "latency"), else
    in FLOPs (:func:`pcee.latency.cost_vector`).
    """

    vec, cost_name = cost_vector(val.flops, latency_profile, cost)
    val, test = val.with_cost(vec), test.with_cost(vec)
    op = choose_operating_point(policy_name, val, params=params, test=test, cost=cost_name, **settings.choice_kwargs())
    fit_idx, _ = split_fit_calibrate(val.labels, op.calibrate_fraction, op.seed)
    curve = sweep_policy(
        policy_name, val.subset(fit_idx), test, **(params or {})
    )  # a report of the test curve, chooses nothing
    get_run_logger().info(
        "%s: %s = %.4g; %s; %s %s",
        policy_name,
        op.param_name,
        op.value if op.value is not None else float("nan"),
        op.guarantee,
        "test accuracy (check)",
        f"{op.test_accuracy:.4f}" if op.test_accuracy is not None else "-",
    )
    return {"policy": policy_name, "op": op, "rows": curve.to_rows()}


@task(name="build-bundle")
def build_bundle(model, policy, flops, meta: dict, val, out_dir: str) -> str:
    """Write the ModelBundle (weights, config, policy with maps and δ, FLOPs, reference outputs)."""

    ModelBundle(model, policy, np.asarray(flops, dtype=np.float64), meta).save(out_dir, reference=val)
    return out_dir


@task(name="exit-metrics")
def exit_metrics(test) -> dict:
    """Per-exit accuracy, ECE, failure AUROC and FLOPs on the test outputs (a report, chooses nothing)."""

    return per_exit_metrics_flat(test.logits, test.labels, test.flops, keys=("accuracy", "ece", "auroc"))


@task(name="plots")
def plots(sweeps: list[dict], policy, val, test, out_dir: str) -> str:
    """Accuracy-vs-cost, achieved-vs-δ, reliability diagrams, exit histogram (PNG) into ``out_dir``."""

    write_pipeline_plots(sweeps, policy, val, test, Path(out_dir))
    return out_dir

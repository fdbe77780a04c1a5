"""Tasks of the ``recalibrate`` flow (flows/recalibrate.py): read traffic, run the champion, bound, certify, save.

Thin wrappers over the library: the traffic store (:mod:`pcee.traffic.store`), the label-free version
(:mod:`pcee.label_free_bound`), the few-label certificate (:mod:`pcee.few_labels`) and the bundle
(:mod:`pcee.bundle`).
"""

from __future__ import annotations

import os
from datetime import datetime

from prefect import get_run_logger, task

from pcee.bundle import ModelBundle
from pcee.calibration.ltt import DEFAULT_CALIBRATE_FRACTION, split_fit_calibrate
from pcee.data.datasets import load_dataset
from pcee.dvc_repo import resolve_data_dir
from pcee.few_labels import certify_few_labels
from pcee.label_free_bound import MarginCalibration, ShiftEstimators, calibrate_margin, synthetic_shifts
from pcee.label_free_bound import label_free_version as build
from pcee.operating_point import DEFAULT_BOUND, DEFAULT_RISK
from pcee.outputs import ExitOutputs
from pcee.settings import Settings
from pcee.traffic.store import TrafficStore
from pcee.training.evaluate import predict_all_exits
from tasks import IO_RETRIES, IO_RETRY_DELAY_S


@task(name="shadow-traffic", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def shadow_traffic(since: str | None, max_rows: int):
    """Shadow rows (ran to the final exit, input stored) since ``since``: the label-free version's rows."""

    store = TrafficStore.from_settings(Settings())
    try:
        return store.shadow_rows(since=datetime.fromisoformat(since) if since else None, last=max_rows)
    finally:
        store.dispose()


@task(name="all-exit-logits")
def all_exit_logits(bundle_dir: str, x):
    """The champion's logits at every exit (N, L, K) for the stored inputs, with its bundle."""
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    bundle = ModelBundle.load(bundle_dir)
    return bundle, (predict_all_exits(bundle.model, x) if len(x) else None)


@task(name="shift-bound", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def shift_bound(bundle, bundle_dir: str, data_dir: str, target_accuracy: float) -> dict:
    """The label-free estimators (validation *fit* rows of the champion's reference) and their margin
    (synthetic shifts of the validation *calibrate* images of ``data_dir``), or the ones the bundle carries."""

    stored = (bundle.meta or {}).get("label_free_bound")
    if stored:
        return stored
    op = (bundle.meta or {}).get("operating_point") or {}
    ref = ExitOutputs.load(os.path.join(bundle_dir, "reference.npz"))
    fraction, seed = op.get("calibrate_fraction") or DEFAULT_CALIBRATE_FRACTION, int(op.get("seed") or 0)
    fit, _ = split_fit_calibrate(ref.labels, fraction, seed)
    estimators = ShiftEstimators.fit(ref.logits[fit], ref.labels[fit])
    val = load_dataset(f"prepared:{resolve_data_dir(data_dir)}").val
    _, cal = split_fit_calibrate(val.y, fraction, seed)
    shifts = synthetic_shifts(val.x[cal], val.y[cal], lambda x: predict_all_exits(bundle.model, x), seed=seed)
    calibration = calibrate_margin(estimators, bundle.policy, shifts, target_accuracy=target_accuracy)
    get_run_logger().info("label-free margin %.3f over %s", calibration.margin(), sorted(calibration.errors))
    return {"estimators": estimators.to_dict(), "calibration": calibration.to_dict()}


@task(name="label-free-version")
def label_free_version(bundle, logits, bound: dict, target_accuracy: float, seed: int, min_rows: int):
    """The label-free version on the shadow rows' logits (:func:`pcee.label_free_bound.label_free_version`)."""

    return build(
        bundle.policy,
        logits,
        ShiftEstimators.from_dict(bound["estimators"]),
        MarginCalibration.from_dict(bound["calibration"]),
        target_accuracy,
        flops=bundle.flops,
        min_rows=min_rows,
        seed=seed,
    )


@task(name="labelled-answers", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def labelled_answers(model_version: str):
    """The labelled requests the version served, in label order (its expected accuracy, its prediction)."""

    store = TrafficStore.from_settings(Settings())
    try:
        return store.labelled_answers(model_version)
    finally:
        store.dispose()


@task(name="certify-few-labels")
def certify_labels(answers, certificate: dict, budget: int):
    """:func:`pcee.few_labels.certify_few_labels` on the version's labelled requests."""

    return certify_few_labels(
        answers.expected_accuracy,
        answers.correct,
        float(certificate["target_accuracy"]),
        float(certificate.get("risk", DEFAULT_RISK)),
        str(certificate.get("bound", DEFAULT_BOUND)),
        budget=budget,
    )


@task(name="read-reference")
def reference_of(bundle_dir: str):
    """A bundle directory's ``reference.npz`` (None when it has none)."""

    return ModelBundle.load_reference(bundle_dir)


@task(name="save-recalibrated-bundle")
def save_bundle(bundle, policy, meta: dict, out_dir: str, reference) -> str:
    """A bundle with ``bundle``'s weights, ``policy``, ``meta`` and ``reference`` (the outputs the monitor
    compares live traffic with: the rows the maps now describe)."""

    ModelBundle(bundle.model, policy, bundle.flops, meta).save(out_dir, reference=reference)
    return out_dir

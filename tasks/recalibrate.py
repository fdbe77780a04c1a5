"""Tasks of the ``recalibrate`` flow (flows/recalibrate.py): read traffic, run the champion, refit, save.

Thin wrappers over the library: the traffic store (:mod:`pcee.traffic.store`), the label-free and
labelled refits (:mod:`pcee.label_free`, :mod:`pcee.recalibration`) and the bundle (:mod:`pcee.bundle`).
"""

from __future__ import annotations

import os
from datetime import datetime

from prefect import task

from tasks import IO_RETRIES, IO_RETRY_DELAY_S


@task(name="labelled-traffic", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def labelled_traffic(since: str | None, max_rows: int):
    from pcee.settings import Settings
    from pcee.traffic.store import TrafficStore

    store = TrafficStore.from_settings(Settings())
    try:
        start = datetime.fromisoformat(since) if since else None
        return store.labelled_inputs(since=start, last=max_rows)
    finally:
        store.dispose()


@task(name="shadow-traffic", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def shadow_traffic(since: str | None, max_rows: int):
    """Shadow rows (ran to the final exit, input stored) since ``since``: the label-free refit's rows."""
    from pcee.settings import Settings
    from pcee.traffic.store import TrafficStore

    store = TrafficStore.from_settings(Settings())
    try:
        return store.shadow_rows(since=datetime.fromisoformat(since) if since else None, last=max_rows)
    finally:
        store.dispose()


@task(name="label-free-refit")
def label_free_step(
    bundle,
    bundle_dir: str,
    logits,
    target_accuracy: float,
    holdout_fraction: float,
    recent_share: float,
    seed: int,
    min_rows: int,
):
    """ATC on the champion's validation reference (or the estimator it carries), then the label-free refit."""
    from pcee.label_free import ATCEstimator, label_free_refit
    from pcee.outputs import ExitOutputs
    from pcee.selective import AnswerRule

    stored = (bundle.meta or {}).get("atc")
    if stored:
        atc = ATCEstimator.from_dict(stored)
    else:
        ref = ExitOutputs.load(os.path.join(bundle_dir, "reference.npz"))
        atc = ATCEstimator().fit(ref.logits, ref.labels)
    result = label_free_refit(
        bundle.policy,
        logits,
        atc,
        target_accuracy=target_accuracy,
        old_rule=AnswerRule.from_dict((bundle.meta or {}).get("answer_rule")),
        flops=bundle.flops,
        recent_share=recent_share,
        holdout_fraction=holdout_fraction,
        min_rows=min_rows,
        seed=seed,
    )
    return result, atc.to_dict()


@task(name="all-exit-logits")
def all_exit_logits(bundle_dir: str, x):
    """The champion's logits at every exit (N, L, K) for the stored inputs, with its policy and FLOPs."""
    import torch

    from pcee.bundle import ModelBundle
    from pcee.training.evaluate import predict_all_exits

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    bundle = ModelBundle.load(bundle_dir)
    return bundle, predict_all_exits(bundle.model, x)


@task(name="refit-maps")
def refit_maps(
    policy,
    logits,
    labels,
    flops,
    min_labels: int,
    holdout_fraction: float,
    recent_share: float,
    seed: int,
    certificate: dict | None = None,
):
    from pcee.recalibration import recalibrate

    return recalibrate(
        policy,
        logits,
        labels,
        flops=flops,
        min_labels=min_labels,
        holdout_fraction=holdout_fraction,
        recent_share=recent_share,
        seed=seed,
        **(certificate or {}),
    )


@task(name="save-recalibrated-bundle")
def save_bundle(bundle, policy, logits, labels, meta: dict, out_dir: str) -> str:
    from pcee.bundle import ModelBundle
    from pcee.outputs import ExitOutputs

    reference = ExitOutputs(logits=logits, labels=labels, flops=bundle.flops)
    ModelBundle(bundle.model, policy, bundle.flops, meta).save(out_dir, reference=reference)
    return out_dir

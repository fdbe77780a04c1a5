"""``recalibrate`` flow: refit the champion's reliability maps on recent labelled traffic.

Deployment ``recalibrate/drift-alert`` is started by an automation (a ``DeploymentEventTrigger``
created with the deployment) on every ``pcee.drift.detected`` event of a ``pcee.model.*``
resource; the event's payload gives the model, its version and the drift window.

Steps: champion bundle (and its certificate: the bundle meta's ``operating_point``, else the
version's ``target_accuracy`` / ``risk`` / ``bound`` tags) → labelled stored inputs since the drift
window's start (feedback arrives after the requests, so everything labelled since the onset
counts) → all exits' logits → :func:`pcee.recalibration.recalibrate` (recent rows weighted over
the validation counts; a held-out part gates). A certified champion (risk-controlled, or PCEE
with a certified operating point) has its threshold chosen again on the held-out rows with the
refit maps, by the same fixed-sequence test, and the refit is accepted only when that point is
certified; an uncertified one must improve the shortfall at the served δ. → a bundle with the
same weights, the new maps and the new certificate (meta ``operating_point``; its
``reference.npz`` becomes the recent rows, the distribution the maps now describe, so the
monitor stops alarming on traffic that is already accounted for) → register a version
(challenger, tagged with the certificate) → move ``champion`` (old champion → ``previous``).

The alias move is the last step: a run killed or failing anywhere before it leaves the champion
as it was (at worst an unpromoted challenger version exists). Too few labels, or no improvement,
or no certified point, is recorded (Prefect artifact + log) and changes nothing.
"""

from __future__ import annotations

import os
from datetime import datetime

import _common  # noqa: F401 - sets sys.path for `tasks` and `monitoring`
from prefect import flow, get_run_logger, task

from _common import certificate_tags, run_dir
from tasks import IO_RETRIES, IO_RETRY_DELAY_S
from tasks import registry as R
from tasks.report import publish_report

DRIFT_EVENT = "pcee.drift.detected"


@task(name="labelled-traffic", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def labelled_traffic(since: str | None, max_rows: int):
    from pcee.traffic.store import TrafficStore

    store = TrafficStore()
    try:
        start = datetime.fromisoformat(since) if since else None
        return store.labelled_inputs(since=start, last=max_rows)
    finally:
        store.dispose()


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
def refit_maps(policy, logits, labels, flops, min_labels: int, holdout_fraction: float, recent_share: float, seed: int,
               certificate: dict | None = None):
    from pcee.recalibration import recalibrate

    return recalibrate(policy, logits, labels, flops=flops, min_labels=min_labels, holdout_fraction=holdout_fraction,
                       recent_share=recent_share, seed=seed, **(certificate or {}))


def _f(v, spec: str = ".4f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _numbers(result, champion: str) -> str:
    """The held-out comparison: old maps at their threshold, refit maps at theirs."""
    if result.old_accuracy is None:
        return ""
    table = (f"| | served threshold | held-out accuracy | accuracy lower bound | shortfall vs {result.delta:.4g} | relative cost |\n"
             f"|---|---|---|---|---|---|\n"
             f"| static maps (v{champion}) | {_f(result.old_threshold, '.4g', 'final exit')} | {_f(result.old_accuracy)} | "
             f"{_f(result.old_accuracy_lower_bound)} | {_f(result.old_shortfall)} | {_f(result.old_relative_cost, '.3f')} |\n"
             f"| recalibrated maps | {_f(result.new_threshold, '.4g', 'final exit')} | {_f(result.new_accuracy)} | "
             f"{_f(result.accuracy_lower_bound)} | {_f(result.new_shortfall)} | {_f(result.new_relative_cost, '.3f')} |\n\n"
             f"held-out rows {result.n_holdout}, refit rows {result.n_refit}, recent-row weight {result.recent_weight:.2f}, gate: {result.gate}")
    if result.gate == "certificate":
        table += (f"; certificate: accuracy >= {result.target_accuracy:g} at risk {result.risk:g} ({result.bound} bound on the "
                  f"{result.n_holdout} held-out rows), certified: {'yes' if result.certified else 'no'}")
    return table


def recalibration_tags(result) -> dict[str, str]:
    """Registry tags of a recalibrated version: the served threshold and, when certified, its certificate."""
    from pcee.operating_point import OperatingPoint

    cert = result.certificate()
    tags = certificate_tags(OperatingPoint(**cert)) if cert is not None else {}
    # the certificate's held-out rows are recent traffic, no test rows: drop the empty check tag
    tags.pop("test_accuracy_check", None)
    return {**tags, "delta": _f(result.new_threshold, ".6g", "inf"), "recalibration_gate": result.gate}


@task(name="save-recalibrated-bundle")
def save_bundle(bundle, policy, logits, labels, meta: dict, out_dir: str) -> str:
    from pcee.bundle import ModelBundle
    from pcee.outputs import ExitOutputs

    reference = ExitOutputs(logits=logits, labels=labels, flops=bundle.flops)
    ModelBundle(bundle.model, policy, bundle.flops, meta).save(out_dir, reference=reference)
    return out_dir


def _record(md: str, name: str, status: str) -> None:
    get_run_logger().info("\n%s", md)
    publish_report(md, key=f"pcee-recalibrate-{name}".lower(), description=f"{name}: {status}")


@flow(name="recalibrate", log_prints=True)
def recalibrate(
    model_name: str,
    model_version: str | None = None,
    window_start: str | None = None,
    window_end: str | None = None,
    min_labels: int = 100,
    max_rows: int = 2000,
    holdout_fraction: float = 0.3,
    recent_share: float = 0.8,
    seed: int = 0,
    experiment: str = "pcee",
) -> dict:
    """Recalibrate ``model_name``'s champion on labelled traffic since ``window_start``."""
    from pcee.recalibration import champion_certificate

    log = get_run_logger()
    champion = R.read_aliases(model_name)["champion"]
    if champion is None:
        raise ValueError(f"model {model_name!r} has no champion to recalibrate")
    if model_version is not None and str(model_version) != str(champion):
        log.info("the drift was seen on v%s; the champion is now v%s: recalibrating the champion", model_version, champion)
    rows = labelled_traffic(window_start, max_rows)
    base = {"model_name": model_name, "champion": champion, "window_start": window_start, "window_end": window_end, "n_labels": len(rows)}
    if len(rows) < min_labels:
        md = (f"# recalibration of {model_name} v{champion}: too few labels\n\n{len(rows)} labelled stored inputs since "
              f"{window_start or 'the beginning'}, need at least {min_labels}. Nothing changed; champion stays v{champion}.")
        _record(md, model_name, "too few labels")
        return {**base, "status": "too_few_labels", "new_version": None}

    work = run_dir("recalibrate")
    bundle_dir = R.fetch_bundle(model_name, champion, str(work / "champion"))
    bundle, logits = all_exit_logits(bundle_dir, rows.x)
    certificate = champion_certificate(bundle.meta, R.version_tags(model_name, champion))
    if certificate:
        log.info("the champion v%s carries a certificate %s: the refit is certified again on held-out rows", champion, certificate)
    result = refit_maps(bundle.policy, logits, rows.y, bundle.flops, min_labels, holdout_fraction, recent_share, seed, certificate)
    numbers = _numbers(result, champion)
    if not result.accepted:
        md = f"# recalibration of {model_name} v{champion}: {result.status}\n\n{result.reason}\n\n{numbers}\n\nNothing changed."
        _record(md, model_name, result.status)
        return {**base, **result.to_dict(), "new_version": None}

    meta = dict(bundle.meta or {})
    meta["recalibration"] = {"from_version": str(champion), "window_start": window_start, "window_end": window_end,
                             **{k: v for k, v in result.to_dict().items() if k != "reason"}}
    if result.certificate() is not None:
        meta["operating_point"] = result.certificate()  # the certificate of the maps now served (held-out recent rows)
        meta["target_accuracy"] = result.target_accuracy
    new_dir = save_bundle(bundle, result.policy, logits, rows.y, meta, str(work / "bundle"))
    tags = {"flow": "recalibrate", "recalibrated_from": str(champion), **recalibration_tags(result),
            "policy": bundle.policy.name, "drift_window_start": str(window_start)}
    for key in ("data_md5", "git_commit"):
        if key in meta:
            tags[key] = str(meta[key])
    reg = R.log_and_register(
        experiment=experiment, run_name=f"recalibrate-{model_name}-v{champion}", model_name=model_name, bundle_dir=new_dir,
        params={"from_version": champion, "delta": result.new_threshold, "old_delta": result.old_threshold, "gate": result.gate,
                "target_accuracy": result.target_accuracy, "risk": result.risk, "bound": result.bound,
                "min_labels": min_labels, "holdout_fraction": holdout_fraction,
                "recent_share": recent_share, "seed": seed, "window_start": str(window_start)},
        metrics={"n_labels": result.n_labels, "recent_weight": result.recent_weight, "certified": float(result.certified),
                 "holdout_accuracy_lower_bound": result.accuracy_lower_bound,
                 "holdout_old_accuracy_lower_bound": result.old_accuracy_lower_bound,
                 "holdout_old_accuracy": result.old_accuracy, "holdout_new_accuracy": result.new_accuracy,
                 "holdout_old_shortfall": result.old_shortfall, "holdout_new_shortfall": result.new_shortfall,
                 "holdout_old_relative_cost": result.old_relative_cost, "holdout_new_relative_cost": result.new_relative_cost},
        tags=tags,
    )
    # Last step: the alias move. Anything that fails or is killed before this leaves the champion as it was.
    aliases = R.promote(model_name, reg["version"])
    cert = result.certificate()
    op_md = ""
    if cert is not None:
        from pcee.operating_point import OperatingPoint

        op_md = f"## Certificate of the recalibrated maps (held-out recent rows)\n\n{OperatingPoint(**cert).markdown()}\n\n"
    md = (f"# recalibration of {model_name}: v{champion} → v{reg['version']}\n\n{result.reason}\n\n{numbers}\n\n{op_md}"
          f"aliases now {aliases}; MLflow run `{reg['run_id']}`")
    _record(md, model_name, f"champion v{reg['version']}")
    return {**base, **result.to_dict(), "new_version": reg["version"], "aliases": aliases, "run_id": reg["run_id"]}


def drift_trigger():
    """The automation: every ``pcee.drift.detected`` on a ``pcee.model.*`` resource runs this deployment."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="recalibrate-on-drift",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": "pcee.model.*"},
        parameters={
            "model_name": "{{ event.payload.model_name }}",
            "model_version": "{{ event.payload.model_version }}",
            "window_start": "{{ event.payload.window_start }}",
            "window_end": "{{ event.payload.window_end }}",
        },
    )


def deployments() -> list:
    """``recalibrate/drift-alert`` with its event trigger (picked up by ``flows/serve.py``)."""
    return [
        recalibrate.to_deployment(
            name="drift-alert",
            triggers=[drift_trigger()],
            concurrency_limit=1,
            description="refit reliability maps on recent labelled traffic after pcee.drift.detected; gate; promote",
        )
    ]


if __name__ == "__main__":
    import sys

    print(recalibrate(model_name=sys.argv[1]))

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

**Label-free first.** Labels come late or never, so before the labelled refit the flow refits
from the *shadow rows* (requests the service also ran to the final exit; their inputs are stored)
without a single label: :func:`pcee.label_free.label_free_refit` (ATC estimate of the final exit's
accuracy, fitted on the champion's validation reference; agreement with the final exit as the
early exits' free label; δ = α; ρ a label-free point estimate). Its gate is held-out agreement
with the final exit on answered rows (a refit that lowers it is refused). An accepted label-free
refit is registered and promoted at once (tag ``recalibration_kind=label_free``, not certified,
the certificate tags say "estimated"). Then, when at least ``min_labels`` labelled stored inputs
exist, the labelled refit runs on the *certified* champion the drift was seen on (its certificate
is the operator's target) and, when accepted, is registered and promoted after it
(``recalibration_kind=labelled``, with its certificate). Each version records which kind it is.

The alias move is the last step: a run killed or failing anywhere before it leaves the champion
as it was (at worst an unpromoted challenger version exists). Too few labels, or no improvement,
or no certified point, is recorded (Prefect artifact + log) and changes nothing.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows._common import MODULE_PATH, answer_rule_tags, certificate_tags, run_dir, version_description
from monitoring.events import DRIFT_EVENT
from tasks import registry as R
from tasks.recalibrate import (
    all_exit_logits,
    label_free_step,
    labelled_traffic,
    refit_maps,
    save_bundle,
    shadow_traffic,
)
from tasks.report import publish_report


def _f(v, spec: str = ".4f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _numbers(result, champion: str, skipped_by_store: int = 0) -> str:
    """The held-out comparison: old maps at their threshold, refit maps at theirs (and the labelled rows
    skipped for a label outside the model's classes, by the store and by the refit)."""
    if result.old_accuracy is None:
        return ""
    table = (
        f"| | served threshold | held-out accuracy | accuracy lower bound | shortfall vs {result.delta:.4g} | relative cost |\n"
        f"|---|---|---|---|---|---|\n"
        f"| static maps (v{champion}) | {_f(result.old_threshold, '.4g', 'final exit')} | {_f(result.old_accuracy)} | "
        f"{_f(result.old_accuracy_lower_bound)} | {_f(result.old_shortfall)} | {_f(result.old_relative_cost, '.3f')} |\n"
        f"| recalibrated maps | {_f(result.new_threshold, '.4g', 'final exit')} | {_f(result.new_accuracy)} | "
        f"{_f(result.accuracy_lower_bound)} | {_f(result.new_shortfall)} | {_f(result.new_relative_cost, '.3f')} |\n\n"
        f"held-out rows {result.n_holdout}, refit rows {result.n_refit}, recent-row weight {result.recent_weight:.2f}, gate: {result.gate}"
        f", impossible labels skipped: {skipped_by_store + result.n_impossible_labels}"
    )
    if result.gate == "certificate":
        table += (
            f"; certificate: accuracy >= {result.target_accuracy:g} at risk {result.risk:g} ({result.bound} bound on the "
            f"{result.n_holdout} held-out rows), certified: {'yes' if result.certified else 'no'}"
        )
    return table


def recalibration_tags(result) -> dict[str, str]:
    """Registry tags of a recalibrated version: the served threshold and, when certified, its certificate."""
    from pcee.operating_point import OperatingPoint

    cert = result.certificate()
    tags = certificate_tags(OperatingPoint(**cert)) if cert is not None else {}
    # the certificate's held-out rows are recent traffic, no test rows: drop the empty check tag
    tags.pop("test_accuracy_check", None)
    return {**tags, "delta": _f(result.new_threshold, ".6g", "inf"), "recalibration_gate": result.gate}


def _label_free_md(result) -> str:
    rule = result.answer_rule
    est = ", ".join(f"{v:.3f}" for v in (result.estimated_accuracy or []))
    return (
        f"| | served δ | answer threshold ρ | held-out agreement with the final exit (answered) | coverage | relative cost |\n"
        f"|---|---|---|---|---|---|\n"
        f"| served maps | {_f(result.old_threshold, '.4g')} | - | {_f(result.old_agreement)} | {_f(result.old_coverage, '.3f')} | "
        f"{_f(result.old_relative_cost, '.3f')} |\n"
        f"| label-free maps | {_f(result.new_threshold, '.4g')} | {_f(rule.threshold if rule else None, '.4g')} | "
        f"{_f(result.new_agreement)} | {_f(result.new_coverage, '.3f')} | {_f(result.new_relative_cost, '.3f')} |\n\n"
        f"shadow rows {result.n_rows} (refit {result.n_refit}, held out {result.n_holdout}), no labels; ATC estimated accuracy per "
        f"exit [{est}]; {rule.guarantee if rule else ''}"
    )


def _register_label_free(
    model_name: str, champion: str, bundle, result, atc: dict, logits, window_start, window_end, experiment: str, work
) -> dict:
    """Register and promote an accepted label-free refit; returns the registry info."""
    meta = dict(bundle.meta or {})
    op = dict(meta.get("operating_point") or {})
    # the operator's target stays (a later labelled refit certifies against it); nothing is certified here
    op.update(
        target_accuracy=result.target_accuracy,
        mode="label_free",
        certified=False,
        served_threshold=result.new_threshold,
        value=result.new_threshold,
        accuracy_lower_bound=None,
        calibrate_accuracy=None,
        answer_rule=result.answer_rule.to_dict(),
        n_fit=result.n_refit,
        n_calibrate=result.n_holdout,
        test_accuracy=None,
        test_relative_cost=None,
        n_test=None,
    )
    meta.update(
        operating_point=op,
        target_accuracy=result.target_accuracy,
        answer_rule=result.answer_rule.to_dict(),
        atc=atc,
        recalibration={
            "kind": "label_free",
            "from_version": str(champion),
            "window_start": window_start,
            "window_end": window_end,
            **{k: v for k, v in result.to_dict().items() if k != "reason"},
        },
    )
    # reference: the shadow rows, labelled with the final exit's answers (the monitor reads their confidences;
    # the ATC estimator travels in meta["atc"], fitted on the original labelled validation outputs)
    new_dir = save_bundle(
        bundle, result.policy, logits, logits[:, -1].argmax(-1), meta, str(work / "label_free_bundle")
    )
    rule = result.answer_rule
    tags = {
        "flow": "recalibrate",
        "recalibration_kind": "label_free",
        "recalibrated_from": str(champion),
        "policy": bundle.policy.name,
        "delta": _f(result.new_threshold, ".6g"),
        "target_accuracy": _f(result.target_accuracy, ".6g"),
        "mode": "label_free",
        "certified": "false",
        "guarantee": f"estimated, no labels: {rule.guarantee}",
        **answer_rule_tags(rule.to_dict()),
        "drift_window_start": str(window_start),
    }
    what = (
        f"{meta.get('model', model_name)}: {model_name} recalibrated from v{champion} (label-free: same weights, reliability maps "
        f"refit on {result.n_rows} shadow rows since {window_start or 'the beginning'} with the final exit's answers as labels, no ground truth)"
    )
    gate = {
        "promote": True,
        "reason": f"label-free agreement gate passed: held-out agreement with the final exit on answered rows "
        f"{_f(result.old_agreement)} -> {_f(result.new_agreement)}; promoted at once",
    }
    return _register_and_promote(
        model_name,
        meta,
        tags,
        what,
        gate,
        experiment=experiment,
        run_name=f"recalibrate-label-free-{model_name}-v{champion}",
        bundle_dir=new_dir,
        params={
            "from_version": champion,
            "kind": "label_free",
            "delta": result.new_threshold,
            "old_delta": result.old_threshold,
            "target_accuracy": result.target_accuracy,
            "answer_threshold": rule.threshold,
            "window_start": str(window_start),
        },
        metrics={
            "n_shadow_rows": result.n_rows,
            "holdout_old_agreement": result.old_agreement,
            "holdout_new_agreement": result.new_agreement,
            "holdout_old_coverage": result.old_coverage,
            "holdout_new_coverage": result.new_coverage,
            "estimated_final_accuracy": (result.estimated_accuracy or [None])[-1],
            "holdout_old_relative_cost": result.old_relative_cost,
            "holdout_new_relative_cost": result.new_relative_cost,
        },
    )


def _register_and_promote(model_name: str, meta: dict, tags: dict, what: str, gate: dict, **register) -> dict:
    """Register a recalibrated bundle (data and code tags carried over from its meta, the version's
    description) and move ``champion`` to it: the last step, so a failure before it changes nothing."""
    tags = {**tags, **{key: str(meta[key]) for key in ("data_md5", "git_commit") if key in meta}}
    reg = R.log_and_register(
        model_name=model_name, tags=tags, description=version_description(what, tags, gate), **register
    )
    return {**reg, "aliases": R.promote(model_name, reg["version"])}


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
    label_free: bool = True,
    min_shadow_rows: int = 50,
) -> dict:
    """Recalibrate ``model_name``'s champion: label-free on shadow rows first, then on labelled traffic since ``window_start``."""
    from pcee.recalibration import champion_certificate

    log = get_run_logger()
    champion = R.read_aliases(model_name)["champion"]
    if champion is None:
        raise ValueError(f"model {model_name!r} has no champion to recalibrate")
    if model_version is not None and str(model_version) != str(champion):
        log.info(
            "the drift was seen on v%s; the champion is now v%s: recalibrating the champion", model_version, champion
        )
    work = run_dir("recalibrate")
    bundle_dir = R.fetch_bundle(model_name, champion, str(work / "champion"))
    lf_out = (
        _label_free(
            model_name,
            champion,
            bundle_dir,
            window_start,
            window_end,
            max_rows,
            holdout_fraction,
            recent_share,
            seed,
            experiment,
            min_shadow_rows,
            work,
        )
        if label_free
        else {"status": "skipped"}
    )
    rows = labelled_traffic(window_start, max_rows)
    base = {
        "model_name": model_name,
        "champion": champion,
        "window_start": window_start,
        "window_end": window_end,
        "n_labels": len(rows),
        "n_impossible_labels": rows.n_impossible,  # skipped by the store: outside the answering model's classes
        "label_free": lf_out,
    }
    if len(rows) < min_labels:
        md = (
            f"# recalibration of {model_name} v{champion}: too few labels\n\n{len(rows)} labelled stored inputs since "
            f"{window_start or 'the beginning'} ({rows.n_impossible} more skipped: label not a class of the model), "
            f"need at least {min_labels}. No labelled refit; champion stays "
            f"v{lf_out.get('new_version') or champion}."
        )
        _record(md, model_name, "too few labels")
        return {**base, "status": "too_few_labels", "new_version": None}

    bundle, logits = all_exit_logits(bundle_dir, rows.x)
    certificate = champion_certificate(bundle.meta, R.version_tags(model_name, champion))
    if certificate:
        log.info(
            "the champion v%s carries a certificate %s: the refit is certified again on held-out rows",
            champion,
            certificate,
        )
    result = refit_maps(
        bundle.policy, logits, rows.y, bundle.flops, min_labels, holdout_fraction, recent_share, seed, certificate
    )
    numbers = _numbers(result, champion, rows.n_impossible)
    if not result.accepted:
        md = f"# recalibration of {model_name} v{champion}: {result.status}\n\n{result.reason}\n\n{numbers}\n\nNothing changed."
        _record(md, model_name, result.status)
        return {**base, **result.to_dict(), "new_version": None}

    meta = dict(bundle.meta or {})
    meta.pop("atc", None)  # the new reference is labelled recent traffic: a later label-free refit fits ATC on it
    meta["recalibration"] = {
        "kind": "labelled",
        "from_version": str(champion),
        "window_start": window_start,
        "window_end": window_end,
        **{k: v for k, v in result.to_dict().items() if k != "reason"},
    }
    if result.certificate() is not None:
        meta["operating_point"] = result.certificate()  # the certificate of the maps now served (held-out recent rows)
        meta["target_accuracy"] = result.target_accuracy
    if result.answer_rule is not None:
        meta["answer_rule"] = result.answer_rule
    new_dir = save_bundle(bundle, result.policy, logits, rows.y, meta, str(work / "bundle"))
    tags = {
        "flow": "recalibrate",
        "recalibration_kind": "labelled",
        "recalibrated_from": str(champion),
        **recalibration_tags(result),
        "policy": bundle.policy.name,
        "drift_window_start": str(window_start),
    }
    what = (
        f"{meta.get('model', model_name)}: {model_name} recalibrated from v{champion} (labelled: same weights, reliability maps "
        f"refit on {result.n_labels} labelled traffic rows since {window_start or 'the beginning'})"
    )
    gate = {
        "promote": True,
        "reason": f"{result.gate} gate passed ({result.status}): held-out accuracy {_f(result.old_accuracy)} -> "
        f"{_f(result.new_accuracy)}, lower bound {_f(result.accuracy_lower_bound)}; promoted",
    }
    # the alias move is the last step: anything that fails or is killed before it leaves the champion as it was
    reg = _register_and_promote(
        model_name,
        meta,
        tags,
        what,
        gate,
        experiment=experiment,
        run_name=f"recalibrate-{model_name}-v{champion}",
        bundle_dir=new_dir,
        params={
            "from_version": champion,
            "delta": result.new_threshold,
            "old_delta": result.old_threshold,
            "gate": result.gate,
            "target_accuracy": result.target_accuracy,
            "risk": result.risk,
            "bound": result.bound,
            "min_labels": min_labels,
            "holdout_fraction": holdout_fraction,
            "recent_share": recent_share,
            "seed": seed,
            "window_start": str(window_start),
        },
        metrics={
            "n_labels": result.n_labels,
            "recent_weight": result.recent_weight,
            "certified": float(result.certified),
            "holdout_accuracy_lower_bound": result.accuracy_lower_bound,
            "holdout_old_accuracy_lower_bound": result.old_accuracy_lower_bound,
            "holdout_old_accuracy": result.old_accuracy,
            "holdout_new_accuracy": result.new_accuracy,
            "holdout_old_shortfall": result.old_shortfall,
            "holdout_new_shortfall": result.new_shortfall,
            "holdout_old_relative_cost": result.old_relative_cost,
            "holdout_new_relative_cost": result.new_relative_cost,
        },
    )
    aliases = reg["aliases"]
    cert = result.certificate()
    op_md = ""
    if cert is not None:
        from pcee.operating_point import OperatingPoint

        op_md = (
            f"## Certificate of the recalibrated maps (held-out recent rows)\n\n{OperatingPoint(**cert).markdown()}\n\n"
        )
    md = (
        f"# recalibration of {model_name}: v{champion} → v{reg['version']}\n\n{result.reason}\n\n{numbers}\n\n{op_md}"
        f"aliases now {aliases}; MLflow run `{reg['run_id']}`"
    )
    _record(md, model_name, f"champion v{reg['version']}")
    return {**base, **result.to_dict(), "new_version": reg["version"], "aliases": aliases, "run_id": reg["run_id"]}


def _label_free(
    model_name: str,
    champion: str,
    bundle_dir: str,
    window_start,
    window_end,
    max_rows: int,
    holdout_fraction: float,
    recent_share: float,
    seed: int,
    experiment: str,
    min_rows: int,
    work,
) -> dict:
    """The label-free step: shadow rows → refit → agreement gate → register and promote (module doc)."""
    from pcee.recalibration import champion_certificate

    log = get_run_logger()
    shadow = shadow_traffic(window_start, max_rows)
    if len(shadow) < min_rows:
        log.info(
            "label-free refit skipped: %d shadow rows since %s, need %d",
            len(shadow),
            window_start or "the beginning",
            min_rows,
        )
        return {"status": "too_few_rows", "n_rows": len(shadow), "new_version": None}
    bundle, logits = all_exit_logits(bundle_dir, shadow.x)
    policy = bundle.policy
    if policy.param_name != "delta" or policy.certifies_itself or not policy.sweeps_in_closed_form:
        log.info("label-free refit skipped: policy %s chooses its threshold with labels", policy.name)
        return {"status": "unsupported_policy", "n_rows": len(shadow), "new_version": None}
    target = champion_certificate(bundle.meta, R.version_tags(model_name, champion)).get("target_accuracy")
    target = float(target if target is not None else policy.served_threshold())
    result, atc = label_free_step(bundle, bundle_dir, logits, target, holdout_fraction, recent_share, seed, min_rows)
    md = f"# label-free recalibration of {model_name} v{champion}: {result.status}\n\n{result.reason}\n\n{_label_free_md(result)}"
    if not result.accepted:
        _record(md + "\n\nNothing changed.", model_name, f"label-free {result.status}")
        return {**result.to_dict(), "new_version": None}
    reg = _register_label_free(
        model_name, champion, bundle, result, atc, logits, window_start, window_end, experiment, work
    )
    _record(
        md + f"\n\naliases now {reg['aliases']}; MLflow run `{reg['run_id']}`",
        model_name,
        f"label-free champion v{reg['version']}",
    )
    return {**result.to_dict(), "new_version": reg["version"], "run_id": reg["run_id"], "aliases": reg["aliases"]}


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
            entrypoint_type=MODULE_PATH,
            triggers=[drift_trigger()],
            concurrency_limit=1,
            description="refit reliability maps on recent labelled traffic after pcee.drift.detected; gate; promote",
        )
    ]


if __name__ == "__main__":
    import sys

    print(recalibrate(model_name=sys.argv[1]))

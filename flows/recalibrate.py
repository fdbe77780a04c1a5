"""``recalibrate`` flow: after a drift alarm, never answer below α without saying so; certify again with labels.

Deployment ``recalibrate/drift-alert`` runs it on two events (automations created with the deployment):
``pcee.drift.detected`` (the monitor saw a drift: the **label-free** step) and ``pcee.labels.ready`` (the
served label-free version has reached a look of its label schedule: the **few-label** step,
``label_free=False``). The payload gives the model, its version and the drift window.

**Label-free, at once** (no labels; docs/architecture.md, "No silent break"): shadow rows since the
window's start (requests the service also ran to the final exit, inputs stored) → all exits' logits →
the label-free estimators and their margin (:func:`tasks.recalibrate.shift_bound`: validation fit rows,
synthetic shifts of the validation calibrate images; carried by the version afterwards) →
:func:`pcee.label_free_bound.label_free_version` (the label-free refit maps, the order labels will
certify; the lower-bound answer rule, or ``unverified``: every request declined) → a version registered
and promoted at once, whose ``verification`` says "unverified under drift" (or "label-free lower bound")
and waits for ``label_budget`` labels; its reference becomes the shadow rows, so the monitor stops
alarming on traffic already accounted for.

**Few labels, as they arrive**: the labelled requests the label-free version served (its own logged
expected accuracy and prediction, in label order) → :func:`pcee.few_labels.certify_few_labels` against
the champion's α, η and bound → when a look certifies, the same maps with the certified ρ are
registered and promoted (``verification`` "certified"); otherwise the run records "waiting for labels
(n/150)" and changes nothing. Too few labels is a status, never a half-written version.

The alias move is the last step of each: a run killed or failing before it leaves the champion as it was.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows._common import MODULE_PATH, answer_rule_tags, run_dir, version_description
from monitoring.events import DRIFT_EVENT, LABELS_EVENT
from pcee.outputs import ExitOutputs
from pcee.recalibration import champion_certificate
from pcee.verification import CERTIFIED, Verification
from tasks import registry as R
from tasks.recalibrate import (
    all_exit_logits,
    certify_labels,
    label_free_version,
    labelled_answers,
    reference_of,
    save_bundle,
    shadow_traffic,
    shift_bound,
)
from tasks.report import publish_report


@flow(name="recalibrate", log_prints=True)
def recalibrate(
    model_name: str,
    model_version: str | None = None,
    window_start: str | None = None,
    window_end: str | None = None,
    max_rows: int = 2000,
    seed: int = 0,
    experiment: str = "pcee",
    label_free: bool = True,
    min_shadow_rows: int = 50,
    label_budget: int = 150,
    data_dir: str = "data",
) -> dict:
    """Label-free version of ``model_name``'s champion (``label_free``), else its few-label certificate."""
    champion = _champion(model_name, model_version)
    work = run_dir("recalibrate")
    bundle_dir = R.fetch_bundle(model_name, champion, str(work / "champion"))
    if not label_free:
        return few_label_step(model_name, champion, bundle_dir, label_budget, experiment, work)
    shadow = shadow_traffic(window_start, max_rows)
    bundle, logits = all_exit_logits(bundle_dir, shadow.x)
    target = _certificate(model_name, champion, bundle)["target_accuracy"]
    bound = shift_bound(bundle, bundle_dir, data_dir, target)
    version = label_free_version(bundle, logits, bound, target, seed, min_shadow_rows)
    meta = label_free_meta(bundle, version, bound, champion, window_start, window_end, label_budget)
    reference = _reference(bundle, bundle_dir, logits)
    new_dir = save_bundle(bundle, version.policy, meta, str(work / "label_free_bundle"), reference)
    tags = {**label_free_tags(version, champion, window_start), "policy": bundle.policy.name}
    reg = _register_and_promote(model_name, champion, meta, tags, new_dir, experiment)
    _record(
        model_name,
        f"# label-free version of {model_name} v{champion} → v{reg['version']}\n\n{version.reason}",
        version.status,
    )
    return {"kind": "label_free", **version.to_dict(), "new_version": reg["version"], "aliases": reg["aliases"]}


def few_label_step(model_name: str, champion: str, bundle_dir: str, budget: int, experiment: str, work) -> dict:
    """Certify the served label-free version's answer rule on its labelled requests (module doc)."""

    bundle = R.load_bundle(bundle_dir)
    verification = Verification.from_meta(bundle.meta)
    if not verification.waiting_for_labels:
        _record(model_name, f"# {model_name} v{champion}: nothing to certify ({verification.status})", "nothing to do")
        return {
            "kind": "few_labels",
            "status": "nothing_to_certify",
            "verification": verification.status,
            "new_version": None,
        }
    answers = labelled_answers(champion)
    result = certify_labels(answers, _certificate(model_name, champion, bundle), verification.label_budget or budget)
    skipped = (
        f"\n\n{answers.n_impossible} stored label(s) skipped: not a class of the model" if answers.n_impossible else ""
    )
    if result.status != "certified" or result.rule is None:
        _record(
            model_name,
            f"# few-label certificate of {model_name} v{champion}: {result.status}\n\n{result.reason}{skipped}",
            result.labels_line,
        )
        return {"kind": "few_labels", **result.to_dict(), "new_version": None}
    meta = certified_meta(bundle, result, champion)
    new_dir = save_bundle(bundle, bundle.policy, meta, str(work / "certified_bundle"), reference_of(bundle_dir))
    tags = {"recalibration_kind": "few_labels", "certified": "true", "policy": bundle.policy.name}
    tags.update(n_labels=str(result.n_labels), **answer_rule_tags(result.rule.to_dict()))
    reg = _register_and_promote(model_name, champion, meta, tags, new_dir, experiment)
    _record(
        model_name,
        f"# few-label certificate of {model_name}: v{champion} → v{reg['version']}\n\n{result.reason}{skipped}",
        "certified",
    )
    return {"kind": "few_labels", **result.to_dict(), "new_version": reg["version"], "aliases": reg["aliases"]}


# ---------------------------------------------------------------------------------------------
# the steps' pieces
# ---------------------------------------------------------------------------------------------
def _champion(model_name: str, model_version: str | None) -> str:
    champion = R.read_aliases(model_name)["champion"]
    if champion is None:
        raise ValueError(f"model {model_name!r} has no champion to recalibrate")
    if model_version is not None and str(model_version) != str(champion):
        get_run_logger().info(
            "the event was about v%s; the champion is now v%s: working on the champion", model_version, champion
        )
    return str(champion)


def _certificate(model_name: str, champion: str, bundle) -> dict:
    """The operator's α, η and bound (the champion's certificate; a label-free version carries them on)."""

    cert = champion_certificate(bundle.meta, R.version_tags(model_name, champion))
    if "target_accuracy" not in cert:
        cert["target_accuracy"] = float(bundle.policy.served_threshold())
    return cert


def _reference(bundle, bundle_dir: str, logits):
    """The shadow rows (labelled with the final exit's answers) when there are any, else the old reference."""

    if logits is None:
        return reference_of(bundle_dir)
    return ExitOutputs(logits=logits, labels=logits[:, -1].argmax(-1), flops=bundle.flops)


def label_free_meta(bundle, version, bound: dict, champion: str, window_start, window_end, budget: int) -> dict:
    """Bundle meta of a label-free version: its rule, its verification, the bound it was chosen with."""

    rule = version.rule.to_dict()
    op = dict((bundle.meta or {}).get("operating_point") or {})
    op.update(mode="label_free", certified=False, answer_rule=rule, accuracy_lower_bound=None, test_accuracy=None)
    op.update(target_accuracy=rule["target_accuracy"], served_threshold=float(version.policy.served_threshold()))
    verification = Verification(version.status, label_budget=int(budget), reason=version.reason)
    recal = {"kind": "label_free", "from_version": champion, "window_start": window_start, "window_end": window_end}
    return {
        **{k: v for k, v in (bundle.meta or {}).items() if k not in ("atc", "recalibration")},
        "operating_point": op,
        "target_accuracy": rule["target_accuracy"],
        "answer_rule": rule,
        "verification": verification.to_dict(),
        "label_free_bound": bound,
        "recalibration": {**recal, **version.to_dict()},
    }


def certified_meta(bundle, result, champion: str) -> dict:
    """Bundle meta of a version certified with few labels: the same maps, the certified ρ."""

    rule = result.rule.to_dict()
    op = dict((bundle.meta or {}).get("operating_point") or {})
    op.update(mode="certified", certified=False, answer_rule=rule, risk=result.risk, bound=result.bound)
    op.update(accuracy_lower_bound=rule["accuracy_lower_bound"], n_calibrate=result.n_labels)
    return {
        **{k: v for k, v in (bundle.meta or {}).items() if k != "recalibration"},
        "operating_point": op,
        "answer_rule": rule,
        "verification": Verification(CERTIFIED, reason=result.reason).to_dict(),
        "recalibration": {"kind": "few_labels", "from_version": champion, **result.to_dict()},
    }


def label_free_tags(version, champion: str, window_start) -> dict[str, str]:
    return {
        "recalibration_kind": "label_free",
        "certified": "false",
        "mode": "label_free",
        "verification": version.status,
        "guarantee": f"estimated, no labels: {version.rule.guarantee}",
        "drift_window_start": str(window_start),
        **answer_rule_tags(version.rule.to_dict()),
    }


def _register_and_promote(
    model_name: str, champion: str, meta: dict, tags: dict, bundle_dir: str, experiment: str
) -> dict:
    """Register the new bundle (data and code tags carried over) and move ``champion`` to it: the last step,
    so a failure before it changes nothing."""
    kind = tags["recalibration_kind"]
    tags = {"flow": "recalibrate", "recalibrated_from": champion, **tags}
    tags.update({key: str(meta[key]) for key in ("data_md5", "git_commit") if key in meta})
    what = f"{meta.get('model', model_name)}: {model_name} from v{champion} ({kind}: same weights)"
    gate = {"promote": True, "reason": f"{kind}: {meta['verification']['reason']}"}
    reg = R.log_and_register(
        experiment=experiment,
        run_name=f"recalibrate-{kind}-{model_name}-v{champion}",
        model_name=model_name,
        bundle_dir=bundle_dir,
        params={"from_version": champion, "kind": kind, "answer_threshold": meta["answer_rule"]["threshold"]},
        metrics={"answer_threshold": float(meta["answer_rule"]["threshold"])},
        tags=tags,
        description=version_description(what, tags, gate),
    )
    return {**reg, "aliases": R.promote(model_name, reg["version"])}


def _record(model_name: str, md: str, status: str) -> None:
    get_run_logger().info("\n%s", md)
    publish_report(md, key=f"pcee-recalibrate-{model_name}".lower(), description=f"{model_name}: {status}")


def drift_trigger():
    """Every ``pcee.drift.detected`` on a ``pcee.model.*`` resource runs the label-free step."""
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


def labels_trigger():
    """Every ``pcee.labels.ready`` (the monitor: a look of the label schedule is reached) runs the few-label step."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="certify-on-labels",
        expect={LABELS_EVENT},
        match={"prefect.resource.id": "pcee.model.*"},
        parameters={
            "model_name": "{{ event.payload.model_name }}",
            "model_version": "{{ event.payload.model_version }}",
            "label_free": False,
        },
    )


def deployments() -> list:
    """``recalibrate/drift-alert`` with its event triggers (picked up by ``flows/serve.py``)."""
    return [
        recalibrate.to_deployment(
            name="drift-alert",
            entrypoint_type=MODULE_PATH,
            triggers=[drift_trigger(), labels_trigger()],
            concurrency_limit=1,
            description="after pcee.drift.detected: the label-free version (declines what it cannot support); "
            "after pcee.labels.ready: its few-label certificate",
        )
    ]


if __name__ == "__main__":
    import sys

    print(recalibrate(model_name=sys.argv[1]))

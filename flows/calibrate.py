"""``calibrate`` flow (deployment ``calibrate/nightly``): take ``@champion``, recompute its outputs on
the latest validation data, refit the reliability maps, sweep δ, register, gate, promote."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows._common import (
    choice_rows,
    gate_and_promote,
    operating_point_metrics,
    operating_point_params,
    operating_point_settings,
    operating_point_tags,
    run_dir,
    run_report,
    version_description,
)
from tasks import calibrate as C
from tasks import data as D
from tasks import registry as R
from tasks import train as T
from tasks.report import publish_report
from tasks.runner import connect_task_runner, make_task_runner


@flow(name="calibrate", task_runner=make_task_runner(), log_prints=True)
def calibrate(
    model_name: str | None = None,
    data_dir: str = "data",
    policy: str | None = None,
    compare_policies: list[str] = ["pcee-ws", "threshold"],  # noqa: B006 - Prefect parameters are JSON
    target_accuracy: float | None = None,
    risk: float | None = None,
    bound: str | None = None,
    mode: str | None = None,
    experiment: str = "pcee",
) -> dict:
    """Refit and re-certify the champion's operating point on the latest validation data.

    α, η, bound and mode default to the champion's own certificate (bundle meta), then params.yaml.
    """
    log = get_run_logger()
    connect_task_runner()  # a Dask scheduler that is gone fails the run now, naming its address
    name = R.resolve_model_name(model_name)
    champion = R.read_aliases(name)["champion"]
    if champion is None:
        raise ValueError(
            f"{name} has no champion to recalibrate; run the train flow first (prefect deployment run train/manual)"
        )
    tags = R.version_tags(name, champion)
    work = run_dir("calibrate")
    bundle = R.load_bundle(R.fetch_bundle(name, champion, str(work / "champion")))
    policy = policy or bundle.policy.name
    own = bundle.policy.get_params() if policy == bundle.policy.name else {}
    # the champion's other parameters (score, bins...) carry over; what the pipeline sets does not
    chosen_here = {bundle.policy.param_name, "alpha", "eta", "bound", "calib_fraction", "seed"}
    params = {k: v for k, v in own.items() if k not in chosen_here}
    previous = bundle.meta.get("operating_point") or {}
    settings = operating_point_settings(
        target_accuracy=target_accuracy
        if target_accuracy is not None
        else previous.get("target_accuracy", tags.get("target_accuracy")),
        risk=risk if risk is not None else previous.get("risk"),
        bound=bound or previous.get("bound"),
        mode=mode or previous.get("mode"),
    )

    data_info = D.version_data(data_dir)
    splits = D.load_data(data_dir)
    validation = D.validate_data(splits)
    outputs = T.compute_outputs(bundle.model, splits)
    val, test = outputs["val"], outputs["test"]
    policies = [policy] + [p for p in compare_policies if p != policy]
    # cost in time where the champion carries a latency profile (pcee profile / the train flow), else FLOPs
    profile = bundle.meta.get("latency_profile")
    futures = [
        C.operating_point.submit(p, val, test, settings, params if p == policy else None, latency_profile=profile)
        for p in policies
    ]
    sweeps = [f.result() for f in futures]
    op = sweeps[0]["op"]
    op.ensure_certified("nothing registered, the champion stays")
    meta = {
        **bundle.meta,
        "data_md5": data_info["md5"],
        "target_accuracy": settings["target_accuracy"],
        "operating_point": op.to_dict(),
        "answer_rule": op.answer_rule,
        "recalibrated_from": champion,
    }
    bundle_dir = C.build_bundle(bundle.model, op.policy, val.flops, meta, val, str(work / "bundle"))
    metrics = C.exit_metrics(test)
    plots_dir = C.plots(sweeps, op.policy, val, test, str(work / "plots"))
    new_tags = {**operating_point_tags(op, data_info["md5"], flow="calibrate"), "recalibrated_from": str(champion)}
    what = (
        f"{bundle.meta.get('model', 'the model')} on {splits.name}, recalibrated from v{champion} by the calibrate flow "
        f"(same weights; reliability maps refit and operating point chosen again on the latest validation data, {len(splits.val.y)} rows)"
    )
    reg = R.log_and_register(
        experiment=experiment,
        run_name=f"calibrate-{name}-v{champion}",
        model_name=name,
        bundle_dir=bundle_dir,
        params={
            "data": splits.name,
            "data_md5": data_info["md5"],
            "recalibrated_from": champion,
            **operating_point_params(op),
            **{f"policy.{k}": v for k, v in params.items()},
        },
        metrics=operating_point_metrics(metrics, op, validation),
        tags=new_tags,
        artifacts={"plots": plots_dir},
        sweep_rows=choice_rows(sweeps),
        description=version_description(what, new_tags),
    )
    result = gate_and_promote(name, reg["version"], bundle_dir, splits, op, what=what, tags=new_tags)
    decision = result["decision"]
    md = run_report(
        f"pcee calibrate: {name} version {reg['version']} (from champion {champion})",
        data_info["md5"],
        sweeps,
        result,
        reg["run_id"],
    )
    publish_report(
        md,
        key="pcee-calibrate-report",
        description=f"{name} v{reg['version']}: gate {'promoted' if decision.promote else 'rejected'}",
    )
    log.info("\n%s", md)
    return {
        "model_name": name,
        "version": reg["version"],
        "from_champion": champion,
        "delta": op.served_threshold,
        "target_accuracy": settings["target_accuracy"],
        "operating_point": op.to_dict(),
        "promoted": decision.promote,
        "aliases": result["aliases"],
        "data_md5": data_info["md5"],
    }


if __name__ == "__main__":
    print(calibrate())

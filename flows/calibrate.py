"""``calibrate`` flow (deployment ``calibrate/nightly``): take ``@champion``, recompute its outputs on
the latest validation data, refit the reliability maps, sweep δ, register, gate, promote."""

from __future__ import annotations

from prefect import flow

from flows._common import (
    choice_rows,
    choose_operating_points,
    gate_and_promote,
    operating_point_metrics,
    operating_point_params,
    operating_point_settings,
    operating_point_tags,
    publish_run_report,
    run_dir,
    version_description,
)
from tasks import calibrate as C
from tasks import data as D
from tasks import registry as R
from tasks import train as T
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
    params = _carried_params(bundle.policy) if policy == bundle.policy.name else {}
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
    sweeps = choose_operating_points(policies, val, test, settings, params, latency_profile=profile)
    op = sweeps[0]["op"]
    meta = _bundle_meta(bundle.meta, data_info, op, champion)
    bundle_dir = C.build_bundle(bundle.model, op.policy, val.flops, meta, val, str(work / "bundle"))
    metrics = C.exit_metrics(test)
    plots_dir = C.plots(sweeps, op.policy, val, test, str(work / "plots"))
    new_tags = {**operating_point_tags(op, data_info["md5"], flow="calibrate"), "recalibrated_from": str(champion)}
    what = _what(bundle.meta, splits, champion)
    reg = R.log_and_register(
        experiment=experiment,
        run_name=f"calibrate-{name}-v{champion}",
        model_name=name,
        bundle_dir=bundle_dir,
        params=_run_params(splits, data_info, champion, op, params),
        metrics=operating_point_metrics(metrics, op, validation),
        tags=new_tags,
        artifacts={"plots": plots_dir},
        sweep_rows=choice_rows(sweeps),
        description=version_description(what, new_tags),
    )
    result = gate_and_promote(name, reg["version"], bundle_dir, splits, op, what=what, tags=new_tags)
    title = f"pcee calibrate: {name} version {reg['version']} (from champion {champion})"
    publish_run_report("calibrate", title, name, reg["version"], data_info["md5"], sweeps, result, reg["run_id"])
    return {
        "model_name": name,
        "version": reg["version"],
        "from_champion": champion,
        "delta": op.served_threshold,
        "target_accuracy": settings.target_accuracy,
        "operating_point": op.to_dict(),
        "promoted": result["decision"].promote,
        "aliases": result["aliases"],
        "data_md5": data_info["md5"],
    }


def _bundle_meta(champion_meta: dict, data_info: dict, op, champion: str) -> dict:
    """The champion's meta with the new data version, operating point and answer rule."""
    return {
        **champion_meta,
        "data_md5": data_info["md5"],
        "target_accuracy": op.target_accuracy,
        "operating_point": op.to_dict(),
        "answer_rule": op.answer_rule,
        "recalibrated_from": champion,
    }


def _what(champion_meta: dict, splits, champion: str) -> str:
    return (
        f"{champion_meta.get('model', 'the model')} on {splits.name}, recalibrated from v{champion} by the calibrate flow "
        f"(same weights; reliability maps refit and operating point chosen again on the latest validation data, {len(splits.val.y)} rows)"
    )


def _run_params(splits, data_info: dict, champion: str, op, params: dict) -> dict:
    return {
        "data": splits.name,
        "data_md5": data_info["md5"],
        "recalibrated_from": champion,
        **operating_point_params(op),
        **{f"policy.{k}": v for k, v in params.items()},
    }


def _carried_params(policy) -> dict:
    """The champion's own parameters (score, bins...) that carry over; not what the pipeline chooses."""
    chosen_here = {policy.param_name, "alpha", "eta", "bound", "calib_fraction", "seed"}
    return {k: v for k, v in policy.get_params().items() if k not in chosen_here}


if __name__ == "__main__":
    print(calibrate())

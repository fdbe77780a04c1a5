"""``train`` flow: version data → validate (GX) → train → outputs → calibrate → sweep → MLflow run
→ register as challenger → gate → promote to champion (old champion → previous)."""

from __future__ import annotations

from pathlib import Path

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
from pcee.operating_point import check_calibration_size
from pcee.outputs import ExitOutputs
from pcee.params import OperatingPointParams
from pcee.registry.tracking import registered_name
from pcee.training.config import TrainConfig
from tasks import calibrate as C
from tasks import data as D
from tasks import registry as R
from tasks import train as T
from tasks.runner import connect_task_runner, make_task_runner

DEFAULT_POLICIES = ("pcee", "pcee-ws", "threshold")


@flow(name="train", task_runner=make_task_runner(), log_prints=True)
def train(
    data_dir: str = "data",
    model: str = "small-cnn",
    preset: str | None = None,
    regime: str = "mixed",
    epochs: int = 10,
    seed: int = 0,
    policy: str = "pcee",
    compare_policies: list[str] = list(DEFAULT_POLICIES),  # noqa: B006 - Prefect parameters are JSON
    target_accuracy: float | None = None,
    risk: float | None = None,
    bound: str | None = None,
    mode: str | None = None,
    cost: str | None = None,
    experiment: str = "pcee",
) -> dict:
    """Train, choose the operating point on validation (certified at risk η by default), register, gate.

    ``target_accuracy``/``risk``/``bound``/``mode`` default to params.yaml's ``calibrate`` section.
    ``cost``: what relative cost counts, "latency" (default: the trained model is profiled on this
    machine, pcee.latency) or "flops".
    """
    connect_task_runner()  # a Dask scheduler that is gone fails the run now, naming its address
    settings = operating_point_settings(target_accuracy=target_accuracy, risk=risk, bound=bound, mode=mode)
    data_info = D.version_data(data_dir)
    splits = D.load_data(data_dir)
    validation = D.validate_data(splits)  # raises ValidationFailed: nothing trained or registered
    _check_calibration_size(len(splits.val), settings)  # a calibrate part too small: fail before training
    config = TrainConfig(regime=regime, epochs=epochs, seed=seed).to_dict()
    net, history = T.train(splits, model, preset, config)
    environment = history.environment  # what decided the weights besides config (pcee.training.reproducibility)
    outputs = T.compute_outputs(net, splits)
    val, test = outputs["val"], outputs["test"]
    profile = T.profile_latency(net, splits.input_shape)  # cost in time: the saving promised is the one served
    policies = [policy] + [p for p in compare_policies if p != policy]
    sweeps = choose_operating_points(policies, val, test, settings, latency_profile=profile, cost=cost)
    op = sweeps[0]["op"]
    name, work = registered_name(splits.name, model), run_dir("train")
    meta = _bundle_meta(splits, data_info, model, preset, op, config, profile, environment)
    bundle_dir = C.build_bundle(net, op.policy, test.flops, meta, val, str(work / "bundle"))
    metrics = C.exit_metrics(test)
    plots_dir = C.plots(sweeps, op.policy, val, test, str(work / "plots"))
    tags = {**operating_point_tags(op, data_info["md5"], flow="train"), "val_final_accuracy": _final_accuracy(val)}
    what = _describe_training(model, preset, splits, val, regime, epochs, seed)
    reg = R.log_and_register(
        experiment=experiment,
        run_name=f"train-{splits.name}-{model}",
        model_name=name,
        bundle_dir=bundle_dir,
        params=_run_params(splits, data_info, model, preset, op, config, environment),
        metrics=operating_point_metrics(metrics, op, validation),
        tags=tags,
        artifacts={"plots": plots_dir, **_write_choice_files(work, validation, op)},
        sweep_rows=choice_rows(sweeps),
        description=version_description(what, tags),
    )
    result = gate_and_promote(name, reg["version"], bundle_dir, splits, op, what=what, tags=tags)
    title = f"pcee train: {name} version {reg['version']}"
    publish_run_report("train", title, name, reg["version"], data_info["md5"], sweeps, result, reg["run_id"])
    return _flow_result(name, reg, op, settings, result, data_info["md5"])


def _describe_training(
    model: str, preset: str | None, splits, val: ExitOutputs, regime: str, epochs: int, seed: int
) -> str:
    """One line on what was trained, on which data and how (the registered version's description)."""
    return (
        f"{model} (preset {preset or 'default'}, {val.logits.shape[1]} exits) trained on {splits.name} "
        f"(train {len(splits.train.y)}, val {len(splits.val.y)}, test {len(splits.test.y)} rows), regime {regime}, {epochs} epochs, seed {seed}"
    )


def _write_choice_files(work: Path, validation: dict, op) -> dict[str, str]:
    """The data validation report and the chosen operating point as JSON run artifacts: name -> path."""
    return {
        "validation": _write_json(work / "validation.json", validation),
        "operating_point": _write_json(work / "operating_point.json", op.to_dict()),
    }


def _flow_result(name: str, reg: dict, op, settings: OperatingPointParams, result: dict, data_md5: str) -> dict:
    """What the flow returns: the registered version, its operating point and the gate's verdict."""
    return {
        "model_name": name,
        "version": reg["version"],
        "run_id": reg["run_id"],
        "delta": op.served_threshold,
        "target_accuracy": settings.target_accuracy,
        "operating_point": op.to_dict(),
        "promoted": result["decision"].promote,
        "aliases": result["aliases"],
        "data_md5": data_md5,
        "sweep": op.sweep,
    }


def _check_calibration_size(n_val: int, settings: OperatingPointParams) -> None:
    check_calibration_size(
        n_val, settings.target_accuracy, settings.risk, settings.bound, settings.calibrate_fraction, settings.mode
    )


def _bundle_meta(
    splits, data_info: dict, model: str, preset: str | None, op, config: dict, profile, environment: dict
) -> dict:
    """The bundle's meta.json: what the service needs to know about the data, the model and its point."""
    return {
        "data": splits.name,
        "data_md5": data_info["md5"],
        "model": model,
        "preset": preset,
        "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes,
        "class_names": list(splits.class_names),
        "target_accuracy": op.target_accuracy,
        "operating_point": op.to_dict(),
        "answer_rule": op.answer_rule,
        "train_config": config,
        "training_environment": environment,
        "latency_profile": profile,
    }


def _run_params(splits, data_info: dict, model: str, preset: str | None, op, config: dict, environment: dict) -> dict:
    """The MLflow run's params: data, model, the operating point, the training configuration and
    what decided the weights besides it (pcee.training.reproducibility)."""
    return {
        "data": splits.name,
        "data_md5": data_info["md5"],
        "model": model,
        "preset": preset or "default",
        **operating_point_params(op),
        **{f"train.{k}": v for k, v in config.items()},
        **{f"train_env.{k}": v for k, v in environment.items()},
    }


def _final_accuracy(val) -> str:
    return f"{float((val.logits[:, -1].argmax(1) == val.labels).mean()):.6g}"


def _write_json(path, obj) -> str:
    import json

    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return str(path)


if __name__ == "__main__":
    print(train())

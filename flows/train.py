"""``train`` flow: version data → validate (GX) → train → outputs → calibrate → sweep → MLflow run
→ register as challenger → gate → promote to champion (old champion → previous)."""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script or loaded by Prefect from its entrypoint: make `_common` and `tasks` importable
for _p in (str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from prefect import flow, get_run_logger  # noqa: E402

from _common import default_target_accuracy, gate_and_promote, operating_point_metrics, operating_point_tags, run_dir, run_report
from tasks import calibrate as C
from tasks import data as D
from tasks import registry as R
from tasks import train as T
from tasks.report import publish_report
from tasks.runner import make_task_runner

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
    compare_policies: list[str] = list(DEFAULT_POLICIES),
    target_accuracy: float | None = None,
    experiment: str = "pcee",
) -> dict:
    log = get_run_logger()
    from pcee.registry.tracking import registered_name
    from pcee.training.config import TrainConfig

    data_info = D.version_data(data_dir)
    splits = D.load_data(data_dir)
    validation = D.validate_data(splits)  # raises ValidationFailed: nothing trained or registered
    config = TrainConfig(regime=regime, epochs=epochs, seed=seed).to_dict()
    net, history = T.train(splits, model, preset, config)
    outputs = T.compute_outputs(net, splits)
    val, test = outputs["val"], outputs["test"]
    target = float(target_accuracy) if target_accuracy is not None else default_target_accuracy()

    policies = [policy] + [p for p in compare_policies if p != policy]
    futures = [C.sweep.submit(p, val, test, target) for p in policies]  # fan-out on the task runner
    sweeps = [f.result() for f in futures]
    chosen = sweeps[0]["chosen"]
    fitted = C.fit_policy(policy, {}, chosen["delta"], val)

    name = registered_name(splits.name, model)
    work = run_dir("train")
    meta = {"data": splits.name, "data_md5": data_info["md5"], "model": model, "preset": preset, "input_shape": list(splits.input_shape),
            "num_classes": splits.num_classes, "class_names": list(splits.class_names), "target_accuracy": target, "train_config": config}
    bundle_dir = C.build_bundle(net, fitted, test.flops, meta, val, str(work / "bundle"))
    metrics = C.exit_metrics(test)
    plots_dir = C.plots(sweeps, fitted, val, test, str(work / "plots"))
    tags = {**operating_point_tags(chosen, target, policy, data_info["md5"], flow="train"),
            "val_final_accuracy": f"{float((val.logits[:, -1].argmax(1) == val.labels).mean()):.6g}"}
    reg = R.log_and_register(
        experiment=experiment, run_name=f"train-{splits.name}-{model}", model_name=name, bundle_dir=bundle_dir,
        params={"data": splits.name, "data_md5": data_info["md5"], "model": model, "preset": preset or "default", "policy": policy,
                "delta": chosen["delta"], "target_accuracy": target, **{f"train.{k}": v for k, v in config.items()}},
        metrics=operating_point_metrics(metrics, chosen, validation), tags=tags, artifacts={"plots": plots_dir, "validation": _write_json(work / "validation.json", validation)},
        sweep_rows=[r for s in sweeps for r in s["rows"]],
    )
    result = gate_and_promote(name, reg["version"], bundle_dir, splits.test, target)
    decision = result["decision"]
    md = run_report(f"pcee train: {name} version {reg['version']}", data_info["md5"], policy, target, sweeps, result, reg["run_id"])
    publish_report(md, key="pcee-train-report", description=f"{name} v{reg['version']}: gate {'promoted' if decision.promote else 'rejected'}")
    log.info("\n%s", md)
    return {"model_name": name, "version": reg["version"], "run_id": reg["run_id"], "delta": chosen["delta"], "target_accuracy": target,
            "promoted": decision.promote, "aliases": result["aliases"], "data_md5": data_info["md5"], "sweep": sweeps[0]["rows"]}


def _write_json(path, obj) -> str:
    import json

    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return str(path)


if __name__ == "__main__":
    print(train())

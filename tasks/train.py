"""Training tasks: build and train the multi-exit model, compute every exit's outputs."""

from __future__ import annotations

from prefect import get_run_logger, task


@task(name="train-model")
def train(splits, model_name: str, preset: str | None, train_config: dict):
    import torch

    from pcee.models.registry import build_model, data_overrides
    from pcee.training.config import TrainConfig
    from pcee.training.trainer import train_model

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    config = TrainConfig.from_dict(train_config)
    model = build_model(model_name, preset=preset, **data_overrides(model_name, splits.input_shape, splits.num_classes))
    history = train_model(model, splits, config, progress=False)
    get_run_logger().info("trained %s (%s) for %d epochs", model_name, config.regime, config.epochs)
    return model, history


@task(name="compute-outputs")
def compute_outputs(model, splits) -> dict:
    """Every exit's logits on val and test, with the model's cumulative per-exit FLOPs."""
    from pcee.models.flops import measure_exit_flops
    from pcee.training.evaluate import compute_outputs as _outputs

    flops = measure_exit_flops(model, splits.input_shape)
    outputs = {name: _outputs(model, getattr(splits, name), flops) for name in ("val", "test")}
    get_run_logger().info("outputs: %d exits, FLOPs %s", len(flops), [f"{f:,.0f}" for f in flops])
    return outputs

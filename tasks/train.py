"""Training tasks: build and train the multi-exit model, compute every exit's outputs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger, task

from pcee.inference.allocator import keep_freed_memory_as_set
from pcee.latency import measure_exit_latency
from pcee.models.flops import measure_exit_flops
from pcee.models.registry import build_model, data_overrides
from pcee.training.config import TrainConfig
from pcee.training.evaluate import compute_outputs as _outputs
from pcee.training.trainer import EPOCH_LOGGER, train_model


class _RunLogForward(logging.Handler):
    """Re-emits a library logger's records on a Prefect run logger (so they reach the run's logs in the UI)."""

    def __init__(self, run_logger) -> None:
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_logger.log(record.levelno, record.getMessage())
        except Exception:  # a log line must never fail the training
            self.handleError(record)


@contextmanager
def run_log_forward(name: str) -> Iterator[None]:
    """Within the block, INFO records of logger ``name`` (e.g. the trainer's per-epoch lines on
    ``pcee.training``) also go to this task run's Prefect log. Needs no Prefect logging setting
    (PREFECT_LOGGING_EXTRA_LOGGERS) in whichever process runs the task."""
    logger = logging.getLogger(name)
    handler, level = _RunLogForward(get_run_logger()), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@task(name="train-model")
def train(splits, model_name: str, preset: str | None, train_config: dict):
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    config = TrainConfig.from_dict(train_config)
    model = build_model(model_name, preset=preset, **data_overrides(model_name, splits.input_shape, splits.num_classes))
    with run_log_forward(
        EPOCH_LOGGER
    ):  # one line per epoch in the run log: loss, val accuracy per exit, elapsed/remaining
        history = train_model(model, splits, config, progress=False)
    get_run_logger().info("trained %s (%s) for %d epochs", model_name, config.regime, config.epochs)
    return model, history


@task(name="profile-latency")
def profile_latency(model, input_shape) -> dict:
    """The model's per-exit latency on this machine (:func:`pcee.latency.measure_exit_latency`), as a dict."""

    keep_freed_memory_as_set()  # time the model as pcee serve runs it
    profile = measure_exit_latency(model, input_shape)
    get_run_logger().info(
        "latency profile (ms per sample, largest batch): %s; a plain forward: %.4f",
        [f"{1000 * s:.4f}" for s in profile.cost()],
        1000 * (profile.plain() or float("nan")),
    )
    return profile.to_dict()


@task(name="compute-outputs")
def compute_outputs(model, splits) -> dict:
    """Every exit's logits on val and test, with the model's cumulative per-exit FLOPs."""

    flops = measure_exit_flops(model, splits.input_shape)
    outputs = {name: _outputs(model, getattr(splits, name), flops) for name in ("val", "test")}
    get_run_logger().info("outputs: %d exits, FLOPs %s", len(flops), [f"{f:,.0f}" for f in flops])
    return outputs

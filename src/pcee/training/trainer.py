"""The training loop: runs a regime's phases over a dataset's train split, logging validation accuracy per exit.

After every epoch the main process logs one line on the ``pcee.training`` logger (phase, epoch i/N,
mean training loss, per-exit validation accuracy, elapsed and estimated remaining time): the progress
report wherever no terminal shows the bar (a log file, CI, a Prefect task). :func:`echo_epochs` prints
those lines on stderr (``pcee train`` does when no bar is shown); ``tasks/train.py`` forwards them to the
Prefect run log.

Works alone or under ``torchrun`` (see :mod:`pcee.training.distributed`): the data order comes from a
``DistributedSampler`` in both cases (one replica when alone), so a run is reproducible from its seed.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from pcee.models.base import MultiExitModel
from pcee.training.augment import apply_augment, resolve_augment
from pcee.training.config import TrainConfig
from pcee.training.device import resolve_device
from pcee.training.distributed import all_reduce_mean, current_context, wrap_ddp
from pcee.training.evaluate import exit_accuracies, predict_all_exits
from pcee.training.regimes import ExitsForward, Phase, apply_phase, build_phases, phase_loss, unfreeze
from pcee.training.reproducibility import pinned_environment

EPOCH_LOGGER = "pcee.training"
log = logging.getLogger(EPOCH_LOGGER)
_ECHO_MARK = "_pcee_echo_epochs"


def echo_epochs(stream=None) -> logging.Handler:
    """Print the per-epoch lines (logger ``pcee.training``, INFO) on ``stream`` (default stderr); idempotent:
    a second call returns the handler of the first. Remove it with ``logging.getLogger(EPOCH_LOGGER).removeHandler``."""
    for handler in log.handlers:
        if getattr(handler, _ECHO_MARK, False):
            return handler
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    setattr(handler, _ECHO_MARK, True)
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    return handler


def format_duration(seconds: float) -> str:
    """``42.0s``, ``3m07s``, ``1h02m``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def epoch_line(record: dict[str, Any], total_epochs: int, elapsed: float) -> str:
    """The per-epoch progress line of one history record (see :func:`train_model`)."""
    done = int(record["epoch"])
    remaining = elapsed / done * (total_epochs - done) if done else 0.0
    acc = record.get("val_accuracy")
    val = f" val acc per exit [{' '.join(f'{a:.3f}' for a in acc)}]" if acc is not None else ""
    return (
        f"{record['regime']}/{record['phase']} epoch {done}/{total_epochs} (phase epoch {record['phase_epoch']}/"
        f"{record['phase_epochs']}) train loss {record['train_loss']:.4f}{val} "
        f"elapsed {format_duration(elapsed)} remaining {format_duration(remaining)}"
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.momentum > 0,
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(
    opt: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    # stepped once per iteration, over one phase
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if config.schedule == "step":
        milestones = sorted({max(1, int(round(m * total_steps))) for m in config.step_milestones})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=config.step_gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    """Mini-batches of ``indices``; a trailing partial batch is dropped when a full one exists
    (a batch of one breaks BatchNorm, and tiny batches give noisy steps)."""
    out = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if len(out) > 1 and len(out[-1]) < batch_size:
        out.pop()
    return out


def _has_unused_parameters(
    exits: ExitsForward, phase: Phase, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, config: TrainConfig
) -> bool:
    """Whether some trainable parameter gets no gradient from the phase's loss (one probe batch in
    eval mode, so no BatchNorm statistic moves and no step is taken)."""
    exits.model.eval()
    loss = phase_loss(phase, exits(x), y if phase.uses_labels else None, config.distill_temperature)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return any(g is None for g in grads)


class TrainHistory(list):
    """The per-epoch records :func:`train_model` returns (a list of dicts), with ``environment``: what decided
    the weights besides the config and seed (:mod:`pcee.training.reproducibility`), for the run's metadata."""

    def __init__(self, records=(), environment: dict[str, Any] | None = None) -> None:
        super().__init__(records)
        self.environment: dict[str, Any] = dict(environment or {})


def train_model(model: MultiExitModel, splits, config: TrainConfig, progress: bool = True) -> TrainHistory:
    """Train ``model`` in place on ``splits.train`` with ``config.regime``; return the per-epoch history.

    Parameters
    ----------
    model : a multi-exit model with ``exit_heads`` (one head per exit).
    splits : a ``DatasetSplits`` (``train`` and ``val`` ``ArraySplit``s with ``x`` (N,C,H,W) float32, ``y`` (N,) int64).
    config : the hyper-parameters; ``config.seed`` fixes data order and augmentation (seed the model's
        initialisation before building it, e.g. with :func:`seed_everything`). ``threads`` and
        ``deterministic`` are pinned for the run (:mod:`pcee.training.reproducibility`).
    progress : show tqdm bars (only on rank 0 and only on a terminal). The per-epoch line on the
        ``pcee.training`` logger is emitted either way (rank 0).

    Returns
    -------
    A :class:`TrainHistory`: one dict per epoch, ``epoch`` (1-based, over all phases), ``phase``,
    ``phase_epoch``, ``lr`` (at the end of the epoch), ``train_loss`` (mean over ranks), ``val_accuracy``
    (list, one per exit; rank 0 only, else None); and ``.environment``, what decided the weights besides
    the config.
    """
    ctx = current_context()
    device = resolve_device(config.device)
    model.to(device)
    phases = build_phases(config, model.num_exits, backbone_frozen=getattr(model, "backbone_pretrained", False))
    augment = resolve_augment(config.augment, tuple(splits.train.x.shape[1:]))
    x_train = torch.as_tensor(np.ascontiguousarray(splits.train.x), dtype=torch.float32)
    y_train = torch.as_tensor(np.asarray(splits.train.y), dtype=torch.int64)
    n = len(y_train)
    if n == 0:
        raise ValueError("the train split is empty")
    # DistributedSampler with one replica when alone: the same data order code either way
    # the sampler only takes len() of its dataset; torch's stub asks for a Dataset
    sampler = DistributedSampler(range(n), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed)  # pyright: ignore[reportArgumentType]
    aug_gen = torch.Generator().manual_seed(config.seed * 1000 + ctx.rank)
    show = progress and ctx.is_main and sys.stderr.isatty()

    history = TrainHistory()
    epoch = 0
    clock = (time.perf_counter(), sum(p.epochs for p in phases))  # start, total epochs over all phases
    with pinned_environment(config, device) as environment:
        history.environment = environment
        try:
            for phase in phases:
                epoch = _run_phase(
                    model,
                    phase,
                    config,
                    x_train,
                    y_train,
                    sampler,
                    augment,
                    aug_gen,
                    device,
                    ctx,
                    splits,
                    history,
                    epoch,
                    show,
                    clock,
                )
        finally:
            unfreeze(model)
            model.eval()
    return history


def _run_phase(
    model: MultiExitModel,
    phase: Phase,
    config: TrainConfig,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    sampler: DistributedSampler,
    augment: str,
    aug_gen: torch.Generator,
    device: torch.device,
    ctx,
    splits,
    history: list[dict[str, Any]],
    epoch: int,
    show: bool,
    clock: tuple[float, int],
) -> int:
    params = apply_phase(model, phase)
    exits = ExitsForward(model, detach_segments=phase.detach_segments)
    if ctx.enabled:
        # re-wrapped per phase: DDP only tracks parameters that require grad when it is built
        unused = _has_unused_parameters(exits, phase, params, x_train[:2].to(device), y_train[:2].to(device), config)
        apply_phase(model, phase)  # the probe ran in eval mode
        forward = wrap_ddp(exits, ctx, device, find_unused_parameters=unused)
    else:
        forward = exits
    steps_per_epoch = len(_batches(list(range(len(sampler))), config.batch_size))
    opt = _optimizer(params, config)
    sched = _scheduler(opt, config, phase.epochs * steps_per_epoch)
    bar = tqdm(range(phase.epochs), desc=f"{config.regime}/{phase.name}", unit="epoch", disable=not show, leave=True)
    for phase_epoch in bar:
        sampler.set_epoch(epoch)
        apply_phase(model, phase)  # evaluation below switches the model to eval mode
        total, count = 0.0, 0
        for idx in _batches(list(sampler), config.batch_size):
            xb = apply_augment(augment, x_train[idx], aug_gen).to(device, non_blocking=True)
            yb = y_train[idx].to(device, non_blocking=True) if phase.uses_labels else None
            logits = forward(xb)  # L x (B, K)
            loss = phase_loss(phase, logits, yb, config.distill_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        epoch += 1
        train_loss = all_reduce_mean(total / max(count, 1), ctx)
        val_acc = None
        if ctx.is_main and splits.val is not None and len(splits.val.y):
            logits = predict_all_exits(model, splits.val.x, batch_size=config.eval_batch_size, device=device)
            val_acc = [float(a) for a in exit_accuracies(logits, np.asarray(splits.val.y))]
        record = {
            "epoch": epoch,
            "phase": phase.name,
            "phase_epoch": phase_epoch + 1,
            "lr": float(opt.param_groups[0]["lr"]),
            "train_loss": train_loss,
            "val_accuracy": val_acc,
        }
        history.append(record)
        if val_acc is not None:
            bar.set_postfix(loss=f"{train_loss:.3f}", val_final=f"{val_acc[-1]:.3f}")
        if ctx.is_main:
            elapsed = time.perf_counter() - clock[0]
            line = epoch_line({**record, "regime": config.regime, "phase_epochs": phase.epochs}, clock[1], elapsed)
            log.info("%s", line, extra={"pcee_epoch": {**record, "total_epochs": clock[1], "elapsed_s": elapsed}})
    bar.close()
    return epoch

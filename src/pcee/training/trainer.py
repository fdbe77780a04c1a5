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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from pcee.models.base import MultiExitModel
from pcee.training.augment import apply_augment, draw_epoch, resolve_augment
from pcee.training.config import TrainConfig
from pcee.training.device import TrainData, resolve_device
from pcee.training.distributed import DistContext, all_reduce_mean, current_context, wrap_ddp
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


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the mini-batches of ``n`` samples; a trailing partial batch is dropped when a full one exists
    (a batch of one breaks BatchNorm, and tiny batches give noisy steps)."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > 1 and sizes[-1] < batch_size:
        sizes.pop()
    return sizes


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


@dataclass
class _Loop:
    """What every phase of one :func:`train_model` call shares."""

    config: TrainConfig
    data: TrainData
    sampler: DistributedSampler
    augment: str
    aug_gen: torch.Generator
    ctx: DistContext
    val: Any  # an ArraySplit (x, y) or None: no per-epoch validation pass
    show: bool
    history: TrainHistory
    started: float = field(default_factory=time.perf_counter)
    total_epochs: int = 0


def _check_switches(config: TrainConfig, device: torch.device, x_shape: tuple[int, ...]) -> None:
    """Fail before any work when ``precision`` or ``channels_last`` cannot run here."""
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision 'bf16' needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} has none: "
            "use precision 'fp32'"
        )
    if config.channels_last and len(x_shape) != 4:
        raise ValueError(
            f"channels_last needs 4-D image inputs (N, C, H, W); the train split's x has shape {tuple(x_shape)}"
        )


@contextmanager
def _memory_format(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """The model in channels-last format within the block (when asked), in the default format after."""
    if channels_last:
        model.to(memory_format=torch.channels_last)  # pyright: ignore[reportCallIssue]
    try:
        yield
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)  # pyright: ignore[reportCallIssue]


def train_model(model: MultiExitModel, splits, config: TrainConfig, progress: bool = True) -> TrainHistory:
    """Train ``model`` in place on ``splits.train`` with ``config.regime``; return the per-epoch history.

    Parameters
    ----------
    model : a multi-exit model with ``exit_heads`` (one head per exit).
    splits : a ``DatasetSplits``, or any object with ``train`` and ``val``: ``train.x`` (N, C, H, W) float32
        and ``train.y`` (N,) int64, numpy arrays or tensors (tensors already on ``config.device`` are used
        where they are, never copied); ``val`` an ``ArraySplit`` (numpy), or None for no per-epoch
        validation pass.
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

    On a GPU no step waits for the host: the split moves to the device once when it fits (else each batch
    is copied from pinned memory, non-blocking), the epoch's order and augmentation draws move once per
    epoch, and the loss is summed on the device and read once per epoch.
    """
    ctx = current_context()
    device = resolve_device(config.device)
    _check_switches(config, device, tuple(splits.train.x.shape))
    model.to(device)
    phases = build_phases(config, model.num_exits, backbone_frozen=getattr(model, "backbone_pretrained", False))
    data = TrainData.place(splits.train.x, splits.train.y, device, config.data_placement)
    if len(data) == 0:
        raise ValueError("the train split is empty")
    # DistributedSampler with one replica when alone: the same data order code either way
    # the sampler only takes len() of its dataset; torch's stub asks for a Dataset
    sampler = DistributedSampler(
        range(len(data)),  # pyright: ignore[reportArgumentType]
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=config.seed,
    )
    loop = _Loop(
        config,
        data,
        sampler,
        augment=resolve_augment(config.augment, tuple(data.x.shape[1:])),
        aug_gen=torch.Generator().manual_seed(config.seed * 1000 + ctx.rank),
        ctx=ctx,
        val=splits.val,
        show=progress and ctx.is_main and sys.stderr.isatty(),
        history=TrainHistory(),
        total_epochs=sum(p.epochs for p in phases),
    )
    with pinned_environment(config, device) as environment, _memory_format(model, config.channels_last):
        loop.history.environment = environment
        try:
            epoch = 0
            for phase in phases:
                epoch = _run_phase(loop, model, phase, epoch)
        finally:
            unfreeze(model)
            model.eval()
    return loop.history


def _run_phase(loop: _Loop, model: MultiExitModel, phase: Phase, epoch: int) -> int:
    config, device = loop.config, loop.data.device
    params = apply_phase(model, phase)
    exits = ExitsForward(model, detach_segments=phase.detach_segments)
    if loop.ctx.enabled:
        # re-wrapped per phase: DDP only tracks parameters that require grad when it is built
        x2, y2 = loop.data.x[:2].to(device), loop.data.y[:2].to(device)
        unused = _has_unused_parameters(exits, phase, params, x2, y2, config)
        apply_phase(model, phase)  # the probe ran in eval mode
        forward = wrap_ddp(exits, loop.ctx, device, find_unused_parameters=unused)
    else:
        forward = exits
    opt = _optimizer(params, config)
    sched = _scheduler(opt, config, phase.epochs * len(_batch_sizes(len(loop.sampler), config.batch_size)))
    bar = tqdm(
        range(phase.epochs), desc=f"{config.regime}/{phase.name}", unit="epoch", disable=not loop.show, leave=True
    )
    for phase_epoch in bar:
        loop.sampler.set_epoch(epoch)
        apply_phase(model, phase)  # evaluation below switches the model to eval mode
        train_loss = all_reduce_mean(_train_epoch(loop, forward, phase, opt, sched), loop.ctx)
        epoch += 1
        record = _end_epoch(loop, model, phase, phase_epoch, epoch, train_loss, float(opt.param_groups[0]["lr"]))
        if record["val_accuracy"] is not None:
            bar.set_postfix(loss=f"{train_loss:.3f}", val_final=f"{record['val_accuracy'][-1]:.3f}")
    bar.close()
    return epoch


def _train_epoch(loop: _Loop, forward: nn.Module, phase: Phase, opt: torch.optim.Optimizer, sched) -> float:
    """One epoch of steps; the mean training loss, read from the device once, at the end."""
    config, data = loop.config, loop.data
    indices = list(loop.sampler)
    sizes = _batch_sizes(len(indices), config.batch_size)
    order = data.order(indices[: sum(sizes)])  # one copy per epoch
    draws = draw_epoch(loop.augment, sizes, loop.aug_gen)
    draws = draws.to(data.device) if draws is not None else None  # one copy per epoch
    autocast = torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    start = 0
    for size in sizes:
        xb, yb = data.batch(order[start : start + size])
        if draws is not None:
            xb = apply_augment(loop.augment, xb, draws[start : start + size])
        if config.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = phase_loss(phase, forward(xb), yb if phase.uses_labels else None, config.distill_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total.add_(loss.detach(), alpha=size)  # summed on the device: no step waits for the host
        start += size
    return _read_loss(total) / max(start, 1)


def _read_loss(total: torch.Tensor) -> float:
    """The epoch's one read of the summed loss from the device (a host sync on a GPU)."""
    return float(total)


def _end_epoch(
    loop: _Loop, model: MultiExitModel, phase: Phase, phase_epoch: int, epoch: int, train_loss: float, lr: float
) -> dict[str, Any]:
    """Validate (rank 0), record the epoch in the history and log its line."""
    val_acc = None
    if loop.ctx.is_main and loop.val is not None and len(loop.val.y):
        logits = predict_all_exits(model, loop.val.x, batch_size=loop.config.eval_batch_size, device=loop.data.device)
        val_acc = [float(a) for a in exit_accuracies(logits, np.asarray(loop.val.y))]
    record = {
        "epoch": epoch,
        "phase": phase.name,
        "phase_epoch": phase_epoch + 1,
        "lr": lr,
        "train_loss": train_loss,
        "val_accuracy": val_acc,
    }
    loop.history.append(record)
    if loop.ctx.is_main:
        elapsed = time.perf_counter() - loop.started
        line = epoch_line(
            {**record, "regime": loop.config.regime, "phase_epochs": phase.epochs}, loop.total_epochs, elapsed
        )
        log.info("%s", line, extra={"pcee_epoch": {**record, "total_epochs": loop.total_epochs, "elapsed_s": elapsed}})
    return record

"""`pcee train`: train a multi-exit model and write the outputs contract (docs/architecture.md).

    pcee train --data digits --model small-cnn --regime mixed --epochs 30 --out DIR

writes, atomically (temporary sibling directory, then rename), ``val.npz``, ``test.npz``,
``meta.json``, ``model.pt`` (state_dict) and ``model.json`` (name + config), then prints a per-exit
table. Progress: a bar per phase on a terminal; wherever no bar is shown (stderr redirected to a
file, CI, nohup, or ``--no-progress``) one line per epoch on stderr instead (phase, epoch i/N, train
loss, per-exit validation accuracy, elapsed and remaining time; ``-v`` prints it beside the bar too).
The same command runs under ``torchrun --nproc_per_node N`` (gloo on CPU): every rank
trains on its shard, rank 0 alone evaluates and writes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcee.cli import parse_model_config
from pcee.data.datasets import load_dataset
from pcee.data.types import DatasetSplits
from pcee.models.backbone import load_backbone_weights
from pcee.models.base import MultiExitModel
from pcee.models.flops import measure_exit_flops
from pcee.models.registry import build_model, data_overrides
from pcee.outputs import write_outputs_dir
from pcee.training.checkpoint import save_checkpoint
from pcee.training.config import (
    AUGMENTATIONS,
    DEVICES,
    OPTIMIZERS,
    PLACEMENTS,
    PRECISIONS,
    REGIMES,
    SCHEDULES,
    TrainConfig,
)
from pcee.training.device import resolve_device
from pcee.training.distributed import init_distributed, shutdown_distributed
from pcee.training.evaluate import compute_outputs, exit_accuracies
from pcee.training.trainer import EPOCH_LOGGER, TrainHistory, echo_epochs, seed_everything, train_model

log = logging.getLogger("pcee.train")

# train-config fields settable from the command line: flag dest -> TrainConfig field
_CONFIG_FLAGS = {
    "regime": "regime",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "optimizer": "optimizer",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "momentum": "momentum",
    "schedule": "schedule",
    "phase1_fraction": "phase1_fraction",
    "distill_temperature": "distill_temperature",
    "augment": "augment",
    "seed": "seed",
    "device": "device",
    "deterministic": "deterministic",
    "threads": "threads",
    "precision": "precision",
    "channels_last": "channels_last",
    "data_placement": "data_placement",
}


def _size(text: str) -> int | float:
    """A split size on the command line: ``500`` (count) or ``0.1`` (fraction)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pcee train`: data and model, hyper-parameters, run switches."""
    _add_data_and_model(parser)
    _add_hyperparameters(parser, TrainConfig())
    _add_run_switches(parser, TrainConfig())


def _add_data_and_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default="digits",
        help="dataset name: digits (default), cifar10, cifar100, imagefolder:<path>, prepared:<dir>",
    )
    parser.add_argument("--data-root", default=None, help="local root for cifar10/cifar100 (never downloaded)")
    parser.add_argument(
        "--data-version", default=None, help="data version to record in meta.json (e.g. the md5 in data.dvc)"
    )
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split (default 0)")
    parser.add_argument("--train-size", type=int, default=None, help="cap on the training split (stratified subset)")
    parser.add_argument(
        "--val-size", type=_size, default=None, help="validation size: a count or a fraction (default 0.2)"
    )
    parser.add_argument(
        "--test-size", type=_size, default=None, help="test size, or a cap where the data has a test set"
    )
    parser.add_argument("--model", default="small-cnn", help="registered model name (default small-cnn)")
    parser.add_argument(
        "--config",
        default=None,
        metavar="PRESET|JSON",
        help="model preset (default: the model's default preset), or a JSON object of config overrides, e.g. "
        '\'{"backbone": "timm:resnet18", "exits": ["layer2", "layer3"]}\' (num_classes, in_chans '
        "and img_size always follow the data)",
    )
    parser.add_argument(
        "--backbone-weights",
        default=None,
        metavar="PATH",
        help="attach-exits only: a local checkpoint (state_dict) of the backbone, loaded after building "
        "(never downloaded); with --regime disjoint only the new exit heads train",
    )
    parser.add_argument("--out", required=True, help="output directory (written atomically)")


def _add_hyperparameters(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    parser.add_argument(
        "--regime", default=d.regime, help=f"training regime: {', '.join(REGIMES)} (default {d.regime})"
    )
    parser.add_argument(
        "--epochs", type=int, default=d.epochs, help=f"total epochs over all phases (default {d.epochs})"
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"per-process batch size (default {d.batch_size})"
    )
    parser.add_argument("--optimizer", default=d.optimizer, help=f"{', '.join(OPTIMIZERS)} (default {d.optimizer})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default {d.weight_decay})")
    parser.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum (default {d.momentum})")
    parser.add_argument("--schedule", default=d.schedule, help=f"{', '.join(SCHEDULES)} (default {d.schedule})")
    parser.add_argument(
        "--phase1-fraction",
        type=float,
        default=d.phase1_fraction,
        help=f"two-phase regimes: share of epochs in phase 1 (default {d.phase1_fraction})",
    )
    parser.add_argument(
        "--distill-temperature",
        type=float,
        default=d.distill_temperature,
        help=f"distill regime's KL temperature (default {d.distill_temperature})",
    )
    parser.add_argument("--augment", default=d.augment, help=f"{', '.join(AUGMENTATIONS)} (default {d.augment})")
    parser.add_argument(
        "--seed", type=int, default=d.seed, help=f"training seed: init, data order, augmentation (default {d.seed})"
    )


def _add_run_switches(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Where and how the run executes: device, threads, determinism, precision, memory format, progress."""
    parser.add_argument("--device", default=d.device, help=f"{', '.join(DEVICES)} (default {d.device})")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per process, pinned while training and recorded in meta.json: the count decides "
        "the weights on CPU (default: torch's choice; 1 is fastest for the tiny digits CNN)",
    )
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=d.deterministic,
        help="deterministic kernels while training (on CUDA: cuDNN's deterministic algorithms, no benchmarking); "
        "--no-deterministic lets cuDNN benchmark, faster on a GPU and not repeatable bit for bit (default: on)",
    )
    parser.add_argument(
        "--precision",
        default=d.precision,
        help=f"{', '.join(PRECISIONS)}: bf16 runs the forward and loss under autocast (default {d.precision})",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="train in channels-last memory format (faster convolutions on recent GPUs; 4-D image inputs)",
    )
    parser.add_argument(
        "--data-placement",
        default=d.data_placement,
        help=f"{', '.join(PLACEMENTS)}: the training split on the device once when it fits (auto), always, "
        f"or copied per batch from pinned host memory (default {d.data_placement})",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (one line per epoch on stderr instead)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log at INFO; the per-epoch line (loss, validation accuracy per exit, elapsed/remaining) also beside the bar "
        "(without -v it is printed whenever no bar is shown: stderr not a terminal, or --no-progress)",
    )


def format_exit_table(test_acc: np.ndarray, val_acc: np.ndarray, flops: np.ndarray) -> str:
    """Per-exit table: exit, test accuracy, validation accuracy, cumulative MFLOPs, relative cost."""
    lines = [f"{'exit':>4}  {'test acc':>8}  {'val acc':>8}  {'cum MFLOPs':>10}  {'rel. cost':>9}"]
    for i, (ta, va, f) in enumerate(zip(test_acc, val_acc, flops, strict=True), start=1):
        lines.append(f"{i:>4}  {ta:>8.4f}  {va:>8.4f}  {f / 1e6:>10.4f}  {f / flops[-1]:>9.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.verbose:  # everything at INFO on stderr, the per-epoch lines included (beside the bar on a terminal)
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # validate every name before any work (and before joining a process group)
    config = TrainConfig(**{field: getattr(args, dest) for dest, field in _CONFIG_FLAGS.items()})
    preset, model_overrides = parse_model_config(args.config)
    _check_backbone_weights(args)
    if args.threads is not None:  # TrainConfig checked it; evaluation after training runs on as many
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ctx = init_distributed(config.device)
    echo = None
    if not args.verbose and (
        args.no_progress or not sys.stderr.isatty()
    ):  # no bar on screen: one line per epoch on stderr
        echo = echo_epochs()
    try:
        started = time.perf_counter()
        splits = _load_splits(args)
        seed_everything(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = _build_model(args, splits, preset, model_overrides)
        flops = np.asarray(measure_exit_flops(model, tuple(splits.input_shape)), dtype=np.float64)
        if ctx.is_main:
            print(
                f"training {args.model} ({model.num_exits} exits) on {args.data} "
                f"(train {len(splits.train.y)}, val {len(splits.val.y)}, test {len(splits.test.y)}), "
                f"regime {config.regime}, {config.epochs} epochs, {ctx.world_size} process(es)",
                flush=True,
            )
        history = train_model(model, splits, config, progress=not args.no_progress)
        if ctx.is_main:
            trained = _Trained(model, preset, flops, config, history, ctx.world_size, started)
            _evaluate_and_write(args, out, splits, trained)
    except BaseException:
        shutdown_distributed(wait=False)
        raise
    finally:
        if echo is not None:
            logging.getLogger(EPOCH_LOGGER).removeHandler(echo)
    shutdown_distributed()
    return 0


def _check_backbone_weights(args: argparse.Namespace) -> None:
    """``--backbone-weights`` goes with ``--model attach-exits`` and names a file that exists."""
    if args.backbone_weights is not None:
        if args.model != "attach-exits":
            raise ValueError(
                f"--backbone-weights needs --model attach-exits (a backbone with exits), not {args.model!r}"
            )
        if not Path(args.backbone_weights).is_file():
            raise FileNotFoundError(f"--backbone-weights {args.backbone_weights} does not exist")


def _load_splits(args: argparse.Namespace) -> DatasetSplits:
    return load_dataset(
        args.data,
        root=args.data_root,
        seed=args.split_seed,
        val_size=args.val_size,
        test_size=args.test_size,
        train_size=args.train_size,
    )


def _build_model(
    args: argparse.Namespace, splits: DatasetSplits, preset: str | None, model_overrides: dict
) -> MultiExitModel:
    """The model of ``--model``/``--config`` fitted to the data, with ``--backbone-weights`` loaded."""
    fit = data_overrides(args.model, splits.input_shape, splits.num_classes)  # the data wins over --config
    model = build_model(args.model, preset=preset, **{**model_overrides, **fit})
    if args.backbone_weights is not None:
        load_backbone_weights(model, args.backbone_weights)
    return model


@dataclass(frozen=True)
class _Trained:
    """A trained model and what its run recorded, for rank 0 to evaluate and write."""

    model: MultiExitModel
    preset: str | None  # of --config (None: the model's default)
    flops: np.ndarray
    config: TrainConfig
    history: TrainHistory
    world_size: int
    started: float  # time.perf_counter() when loading the data began


def _evaluate_and_write(args: argparse.Namespace, out: Path, splits: DatasetSplits, trained: _Trained) -> None:
    """Rank 0: compute the val and test outputs, write the outputs directory atomically, print the exit table."""
    model, flops, config = trained.model, trained.flops, trained.config
    device = resolve_device(config.device)
    outputs = {
        name: compute_outputs(model, getattr(splits, name), flops, batch_size=config.eval_batch_size, device=device)
        for name in ("val", "test")
    }
    val_acc = exit_accuracies(outputs["val"].logits, outputs["val"].labels)
    test_acc = exit_accuracies(outputs["test"].logits, outputs["test"].labels)
    meta = {
        **_data_meta(args, splits),
        "model": model.model_name,
        "preset": getattr(model, "preset", trained.preset),
        "backbone_weights": args.backbone_weights,
        "config": model.config,
        "num_exits": int(model.num_exits),
        "flops": flops.tolist(),
        "train_config": config.to_dict(),
        "world_size": trained.world_size,
        "val_accuracy": val_acc.tolist(),
        "test_accuracy": test_acc.tolist(),
        "history": trained.history,
        "train_seconds": round(time.perf_counter() - trained.started, 3),
        "torch_version": torch.__version__,
        "training_environment": trained.history.environment,  # what decided the weights besides train_config
    }
    with tempfile.TemporaryDirectory(prefix="pcee-ckpt-") as tmp:
        weights, spec = save_checkpoint(tmp, model)
        write_outputs_dir(out, outputs, meta, extra_files={"model.pt": weights, "model.json": spec})
    print(format_exit_table(test_acc, val_acc, flops))
    print(f"wrote outputs (val.npz, test.npz, meta.json, model.pt, model.json) to {out}")


def _data_meta(args: argparse.Namespace, splits: DatasetSplits) -> dict[str, Any]:
    """meta.json's description of the data: name, version, split and classes."""
    return {
        "dataset": args.data,
        "data_version": args.data_version,
        "split_seed": args.split_seed,
        "num_classes": int(splits.num_classes),
        "class_names": [str(c) for c in splits.class_names],
        "input_shape": [int(s) for s in splits.input_shape],
        "split_sizes": {name: int(len(getattr(splits, name).y)) for name in ("train", "val", "test")},
    }

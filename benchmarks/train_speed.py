"""pcee's trainer vs a plain PyTorch loop, per epoch, side by side (issue 27, item 4).

For each model (random weights, random inputs except the digits case) the same epochs run twice per
repetition, in alternating order:

- ``trainer``: :func:`pcee.training.train_model` (regime ``joint``: every exit's cross-entropy summed,
  SGD with Nesterov momentum, cosine schedule, no augmentation, no validation pass), one call for
  ``--epochs`` epochs, its set-up included (data placement, optimizer, sampler);
- ``plain``: the loop anyone would write: the data on the device beforehand, ``torch.randperm`` on the
  device, index, forward, the summed cross-entropy, ``zero_grad`` / ``backward`` / ``step``; the same
  optimizer and batch size, no scheduler, nothing read back until the end.

Both get the same input tensors (on the device when the device is a GPU) and the same switches
(``--precision bf16``: autocast; ``--channels-last``; the trainer's threads and deterministic switches,
:func:`pcee.training.reproducibility.pinned_environment`: without ``--deterministic`` cuDNN benchmarks,
with it torch's and cuDNN's deterministic algorithms, for both). Times are seconds per epoch, medians
of ``--repeats`` repetitions (a first, untimed repetition warms up); "ratio" is the median of the
paired ratios trainer / plain (issue 27's goal on a GPU: <= 1.1). On CPU, process CPU time (the work
done, much less disturbed by other load on a shared machine than wall time; run with one thread) is
reported beside wall time, and its ratio is the headline there. On CUDA, both sides are synchronised
before the clock stops.

Models: ``small-cnn-digits`` (the bundled digits, 1,437 training rows, batch 64: per-step overhead
dominates), ``small-cnn-32`` (3x32x32, the CIFAR preset, 512 rows, batch 64), ``tv-resnet18`` and ``msdnet`` (issue 27's
models: exits on torchvision's ResNet-18, MSDNet cifar10-anytime). Defaults: the two small CNNs on CPU,
``tv-resnet18`` and ``msdnet`` at 10,000 rows, batch 256, 2 timed epochs on CUDA (the issue's
measurement).

Run: uv run python benchmarks/train_speed.py [--device auto|cpu|cuda] [--models small-cnn-digits,small-cnn-32]
     [--rows N] [--batch-size B] [--epochs 2] [--repeats 5] [--threads 1] [--precision fp32|bf16]
     [--channels-last] [--deterministic]

Other scripts (``benchmarks/gpu_speed.py``) call :func:`compare` for one model and read its dict.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pcee.models.registry import build_model  # noqa: E402
from pcee.training import TrainConfig, seed_everything, train_model  # noqa: E402
from pcee.training.reproducibility import pinned_environment  # noqa: E402


@dataclass(frozen=True)
class Case:
    """A model to train and the data it trains on."""

    build: Callable[[], torch.nn.Module]
    input_shape: tuple[int, int, int]
    rows: int  # default number of training rows (random data); 0: the bundled digits
    batch_size: int


CASES = {
    "small-cnn-digits": Case(lambda: build_model("small-cnn"), (1, 8, 8), 0, 64),
    "small-cnn-32": Case(
        lambda: build_model("small-cnn", preset="cifar", in_chans=3, img_size=32), (3, 32, 32), 512, 64
    ),
    "tv-resnet18": Case(lambda: build_model("attach-exits", preset="tv-resnet18"), (3, 32, 32), 10_000, 256),
    "msdnet": Case(lambda: build_model("msdnet", preset="cifar10-anytime"), (3, 32, 32), 10_000, 256),
}
DEFAULT_MODELS = {"cpu": ["small-cnn-digits", "small-cnn-32"], "cuda": ["tv-resnet18", "msdnet"]}


@dataclass
class Data:
    """The training split as ``train_model`` reads it (``x``, ``y``), without a validation split."""

    x: Any
    y: Any


@dataclass
class Splits:
    train: Data
    val: None = None


def make_data(case: Case, rows: int | None, device: torch.device, seed: int = 0) -> Splits:
    """The case's training rows as tensors on ``device`` (digits: the real training split)."""
    if case.rows == 0:
        from pcee.data.datasets import load_dataset

        split = load_dataset("digits", seed=seed).train
        x, y = torch.as_tensor(split.x), torch.as_tensor(split.y)
    else:
        n = rows or case.rows
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand((n, *case.input_shape), generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
    return Splits(Data(x.to(device), y.to(device)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, epochs: int) -> None:
    """The reference: a plain PyTorch training loop over data already on the device (every exit's CE summed)."""
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    bf16 = getattr(config, "precision", "fp32") == "bf16"
    channels_last = getattr(config, "channels_last", False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    n, b = len(y), config.batch_size
    for _ in range(epochs):
        perm = torch.randperm(n, device=x.device)
        for start in range(0, n - b + 1, b):  # full batches only, as the trainer
            idx = perm[start : start + b]
            xb, yb = x[idx], y[idx]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                loss = sum(F.cross_entropy(z, yb) for z in model(xb))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # pyright: ignore[reportAttributeAccessIssue]
            opt.step()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)


def _timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn``, the device synchronised before and after."""
    _sync(device)
    w, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - w, time.process_time() - c


def compare(
    model_name: str,
    device: str = "auto",
    rows: int | None = None,
    batch_size: int | None = None,
    epochs: int = 2,
    repeats: int = 5,
    train_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time ``train_model`` and :func:`plain_loop` on ``model_name`` (a key of ``CASES``) side by side.

    ``train_options``: extra ``TrainConfig`` fields, applied to both sides where they mean something to
    the plain loop (``precision``, ``channels_last``, ``deterministic``). Returns per-epoch seconds
    (lists per repetition and medians) and the median paired ratio trainer / plain, wall and CPU.
    """
    case = CASES[model_name]
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    splits = make_data(case, rows, dev)
    options = {"deterministic": False, **(train_options or {})}
    config = TrainConfig(
        regime="joint",
        epochs=epochs,
        batch_size=batch_size or case.batch_size,
        augment="none",
        device=dev.type,
        **options,
    )
    seed_everything(0)
    trainer_model, plain_model = case.build().to(dev), case.build().to(dev)
    x, y = splits.train.x, splits.train.y

    def trainer() -> None:
        train_model(trainer_model, splits, config, progress=False)

    def plain() -> None:
        with pinned_environment(config, dev):  # the trainer's switches: threads, deterministic, cuDNN
            plain_loop(plain_model, x, y, config, epochs)

    times: dict[str, list[tuple[float, float]]] = {"trainer": [], "plain": []}
    for rep in range(repeats + 1):  # repetition 0 warms up (allocator, cuDNN, lazy init)
        order = [("trainer", trainer), ("plain", plain)]
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            t = _timed(fn, dev)
            if rep > 0:
                times[name].append((t[0] / epochs, t[1] / epochs))
    wall = {k: np.array([t[0] for t in v]) for k, v in times.items()}
    cpu = {k: np.array([t[1] for t in v]) for k, v in times.items()}
    return {
        "model": model_name,
        "device": str(dev),
        "rows": len(y),
        "batch_size": config.batch_size,
        "epochs": epochs,
        "options": options,
        "wall_s": {k: v.tolist() for k, v in wall.items()},
        "cpu_s": {k: v.tolist() for k, v in cpu.items()},
        "trainer_s": float(np.median(wall["trainer"])),
        "plain_s": float(np.median(wall["plain"])),
        "ratio": float(np.median(wall["trainer"] / wall["plain"])),
        "trainer_cpu_s": float(np.median(cpu["trainer"])),
        "plain_cpu_s": float(np.median(cpu["plain"])),
        "cpu_ratio": float(np.median(cpu["trainer"] / cpu["plain"])),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'model':<18}{'device':>8}{'rows':>7}{'batch':>6}"
        f"{'trainer s/ep':>14}{'plain s/ep':>12}{'ratio':>7}{'trainer cpu s/ep':>18}{'plain cpu s/ep':>16}{'cpu ratio':>10}"
    ]
    for r in results:
        lines.append(
            f"{r['model']:<18}{r['device']:>8}{r['rows']:>7}{r['batch_size']:>6}"
            f"{r['trainer_s']:>14.4f}{r['plain_s']:>12.4f}{r['ratio']:>7.2f}"
            f"{r['trainer_cpu_s']:>18.4f}{r['plain_cpu_s']:>16.4f}{r['cpu_ratio']:>10.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument(
        "--rows", type=int, default=None, help="training rows of the random-data models (default: per model)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: per model")
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed call (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--deterministic", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    torch.set_num_threads(args.threads)
    device = (
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    models = args.models.split(",") if args.models else DEFAULT_MODELS[device]
    unknown = [m for m in models if m not in CASES]
    if unknown:
        p.error(f"unknown model(s) {unknown}; valid: {', '.join(CASES)}")
    options: dict[str, Any] = {"deterministic": args.deterministic}
    if args.precision is not None:
        options["precision"] = args.precision
    if args.channels_last:
        options["channels_last"] = True
    results = [compare(m, device, args.rows, args.batch_size, args.epochs, args.repeats, options) for m in models]
    print(
        f"pcee trainer vs a plain PyTorch loop, seconds per epoch (medians of {args.repeats} repetitions, "
        f"{args.epochs} epochs per call; ratio: median of paired trainer/plain); torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), options {options}"
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

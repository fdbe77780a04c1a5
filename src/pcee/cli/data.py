"""`pcee data prepare` (write a byte-deterministic snapshot) and `pcee data info` (describe one)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from pcee.data.datasets import DATASET_FORMS, DatasetSplits, load_dataset
from pcee.data.prepared import save_prepared


def _size(text: str) -> int | float:
    """'500' -> 500 samples, '0.2' -> a fraction."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int count or a float fraction, got {text!r}") from None


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help=f"dataset: {', '.join(DATASET_FORMS)} (default digits)")
    p.add_argument("--root", default=None, help="local root for cifar10/cifar100 (holds cifar-10-batches-py/)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--val-size", type=_size, default=None, help="val count or fraction (default 0.2)")
    p.add_argument(
        "--test-size", type=_size, default=None, help="test count/fraction, or a cap where a test set exists"
    )
    p.add_argument("--train-size", type=int, default=None, help="cap on the training split")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = sub.add_parser("prepare", help="load, split and write a snapshot directory (what DVC tracks)")
    _add_source(prepare)
    prepare.add_argument("--out", default="data", help="snapshot directory (default data)")
    info = sub.add_parser("info", help="print a dataset's classes, shapes, split sizes and pixel range")
    _add_source(info)


def _load(args: argparse.Namespace) -> tuple[DatasetSplits, float]:
    started = time.perf_counter()
    splits = load_dataset(
        args.data,
        root=args.root,
        seed=args.seed,
        val_size=args.val_size,
        test_size=args.test_size,
        train_size=args.train_size,
    )
    return splits, time.perf_counter() - started


def _describe(splits: DatasetSplits, seconds: float) -> None:
    c, h, w = splits.input_shape
    print(f"dataset      {splits.name}")
    print(f"input shape  {c}x{h}x{w} (C x H x W), float32 in [0, 1]")
    names = ", ".join(splits.class_names[:12]) + (" ..." if splits.num_classes > 12 else "")
    print(f"classes      {splits.num_classes}: {names}")
    print(f"{'split':<6} {'n':>7} {'min':>6} {'max':>6} {'mean':>7}  smallest/largest class")
    for part in ("train", "val", "test"):
        s = getattr(splits, part)
        counts = np.bincount(s.y, minlength=splits.num_classes)
        print(
            f"{part:<6} {len(s):>7} {s.x.min():>6.3f} {s.x.max():>6.3f} {s.x.mean():>7.4f}  {counts.min()}/{counts.max()}"
        )
    print(f"loaded in    {seconds:.2f} s")


def run(args: argparse.Namespace) -> int:
    splits, seconds = _load(args)
    _describe(splits, seconds)
    if args.action == "prepare":
        out = save_prepared(splits, args.out)
        total = sum(f.stat().st_size for f in out.iterdir())
        print(f"wrote        {out.resolve()} ({total / 1e6:.1f} MB; read it back with --data prepared:{args.out})")
    return 0

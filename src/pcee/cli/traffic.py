"""`pcee traffic`: send real HTTP traffic from a dataset split (optionally corrupted) to the service."""

from __future__ import annotations

import argparse
import asyncio
import json

from pcee.data.corruptions import CORRUPTIONS, corrupt
from pcee.data.datasets import load_dataset
from pcee.serving.auth import client_token
from pcee.settings import Settings
from pcee.traffic.loadgen import run_load


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL (default http://127.0.0.1:8000)")
    p.add_argument("--data", default="digits", help="dataset name (see `pcee data info`), default digits")
    p.add_argument("--root", default=None, help="dataset root for cifar10/cifar100")
    p.add_argument(
        "--split", default="test", choices=("train", "val", "test"), help="which split to send (default test)"
    )
    p.add_argument("--corruption", default=None, help="corruption name (e.g. gaussian_noise); none by default")
    p.add_argument("--severity", type=int, default=3, help="corruption severity 1-5 (default 3)")
    p.add_argument("--n", type=int, default=1000, help="number of requests (cycles through the split)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--feedback-rate", type=float, default=0.0, help="fraction of answers whose true label is posted")
    p.add_argument("--shuffle", action="store_true", help="shuffle the split before sending")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--token",
        default=None,
        help="the service's bearer token (default $PCEE_SERVE_TOKEN, else the one make up generated)",
    )


def run(args: argparse.Namespace) -> int:
    import numpy as np

    splits = load_dataset(args.data, root=args.root, seed=args.seed)
    split = getattr(splits, args.split)
    x, y = split.x, split.y
    if args.shuffle:
        order = np.random.default_rng(args.seed).permutation(len(y))
        x, y = x[order], y[order]
    if args.corruption:
        if args.corruption not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {args.corruption!r}; choose from {', '.join(CORRUPTIONS)}")
        x = corrupt(x, args.corruption, args.severity, seed=args.seed)
    result = asyncio.run(
        run_load(
            args.url,
            np.asarray(x, dtype=np.float32),
            y,
            args.n,
            args.concurrency,
            args.feedback_rate,
            seed=args.seed,
            token=args.token or client_token(Settings()),
        )
    )
    what = f"{args.data}/{args.split}" + (f" {args.corruption}@{args.severity}" if args.corruption else " clean")
    if args.json:
        print(json.dumps({"traffic": what, **result.summary()}, indent=2))
    else:
        print(f"traffic {what} -> {args.url}")
        print(result.format())
    return 0 if result.errors == 0 else 1

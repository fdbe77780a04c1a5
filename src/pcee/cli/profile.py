"""``pcee profile``: measure a bundle's per-exit latency on this machine and store it in the bundle.

    pcee profile --bundle runs/bundle                 # print the table, write meta.json's latency_profile
    pcee profile --bundle runs/bundle --out prof.json --no-write

The profile (:class:`pcee.latency.LatencyProfile`) is the time per sample to be answered at each
exit, as the early-exit runner serves it (segments, the confidence pass and decision at every exit on
the way, the answer bookkeeping), at the batch sizes the server uses (``--batch-sizes``, default
1,8,64), beside the FLOPs share, on the device the server uses (``--device cuda``, with ``--graphs``
when it serves with CUDA graphs). ``--method segments`` times the segments alone instead.
Once a bundle carries one, choosing an operating point counts cost in time by default
(``pcee calibrate --latency-profile``, the flows): the saving a point promises is the one served.
Measure on the serving machine, with the thread count the server uses (``--threads``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pcee.atomic import write_json_atomic
from pcee.bundle import ModelBundle
from pcee.inference.allocator import keep_freed_memory_as_set
from pcee.inference.device import resolve_device
from pcee.latency import DEFAULT_BATCH_SIZES, measure_exit_latency
from pcee.settings import CUDA_SERVE_MAX_BATCH


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers like 1,8,64, got {text!r}")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory (weights.pt, model.json, ..., meta.json)")
    p.add_argument("--batch-sizes", type=_sizes, default=None, help="comma-separated (default 1,8,64; cuda: and 256)")
    p.add_argument("--repeats", type=int, default=20, help="timed passes per batch size (median; default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads while timing (default: torch's)")
    p.add_argument(
        "--method",
        choices=("runner", "segments"),
        default="runner",
        help="runner (default): the served path, decisions included; segments: the model's segments alone",
    )
    p.add_argument("--device", default="cpu", help="where to time: cpu (default), cuda or cuda:<index>")
    p.add_argument(
        "--graphs", action="store_true", help="time the runner with CUDA graphs per segment and batch bucket"
    )
    p.add_argument("--out", default=None, help="also write the profile as JSON here")
    p.add_argument(
        "--no-write", action="store_true", help="do not store the profile in the bundle's meta.json (latency_profile)"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    bundle_dir = Path(args.bundle)
    if not bundle_dir.is_dir():
        raise FileNotFoundError(f"bundle directory {bundle_dir} does not exist")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    keep_freed_memory_as_set()  # time the model as pcee serve runs it
    device = resolve_device(args.device)
    bundle = ModelBundle.load(bundle_dir, map_location=device)
    bundle.model.to(device)
    shape = bundle.meta.get("input_shape")
    if not shape or len(shape) != 3:
        raise ValueError(f"{bundle_dir / 'meta.json'} has no input_shape [C, H, W] to profile with")
    profile = measure_exit_latency(
        bundle.model,
        shape,
        batch_sizes=args.batch_sizes
        or (DEFAULT_BATCH_SIZES if device.type == "cpu" else (*DEFAULT_BATCH_SIZES, CUDA_SERVE_MAX_BATCH)),
        repeats=args.repeats,
        warmup=args.warmup,
        method=args.method,
        score=bundle.policy.score,  # the served policy's confidence score: the scores differ in cost
        runner_options={"graphs": True} if args.graphs else None,
    )
    print(
        f"latency profile of {bundle.model.model_name} ({bundle_dir}), {profile.method} method, "
        f"{profile.threads} torch threads, {profile.machine}, device {profile.device}"
    )
    print(profile.markdown(flops=bundle.flops))
    if args.out:
        write_json_atomic(args.out, profile.to_dict())
        print(f"wrote {args.out}")
    if not args.no_write:
        meta_path = bundle_dir / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["latency_profile"] = profile.to_dict()
        write_json_atomic(meta_path, meta)
        print(f"stored in {meta_path} (latency_profile): operating points chosen for this bundle count cost in time")
    return 0

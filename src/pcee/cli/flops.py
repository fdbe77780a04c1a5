"""``pcee flops``: a model's cumulative per-exit cost table.

    pcee flops --model msdnet --config cifar100-anytime

Columns: exit, FLOPs (M) and MACs (M) from torch.utils.flop_counter on one sample, the MSDNet
port's op-count convention (M), the published reference in that convention where known with
the relative difference, and the cost relative to the final exit.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from pcee.cli import parse_model_config
from pcee.models.flops import default_input_shape, measure_exit_flops, port_op_count, reference_mflops
from pcee.models.registry import build_model


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, lists: JSON; anything else: a string
    except json.JSONDecodeError:
        return key, value


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}")
    return shape  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="msdnet", help="registered model name (default: msdnet)")
    parser.add_argument(
        "--config",
        default=None,
        help="preset of the model (default: the model's default preset), or a JSON object of "
        'config overrides, e.g. \'{"backbone": "timm:resnet18"}\' for attach-exits',
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="override one config field (repeatable), e.g. --set num_classes=10",
    )
    parser.add_argument(
        "--input-shape",
        type=_parse_shape,
        default=None,
        metavar="C,H,W",
        help="one sample's shape (default: from the config's in_chans and img_size)",
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON instead of text")


def run(args: argparse.Namespace) -> int:

    preset, overrides = parse_model_config(args.config)
    model = build_model(args.model, preset, **{**overrides, **dict(args.overrides)})
    shape = args.input_shape or default_input_shape(model)
    flops = measure_exit_flops(model, shape)
    port = port_op_count(model, shape)
    # a published reference applies only to the unmodified preset at its own input size
    ref = None if args.input_shape or model.preset is None else reference_mflops(model.model_name, model.preset)
    rows = []
    for i in range(len(flops)):
        rows.append(
            {
                "exit": i + 1,
                "flops_m": flops[i] / 1e6,
                "macs_m": flops[i] / 2e6,
                "port_mflops": port[i] / 1e6,
                "reference_mflops": None if ref is None else float(ref[i]),
                "reference_rel_diff": None if ref is None else float(port[i] / 1e6 / ref[i] - 1),
                "relative_cost": flops[i] / flops[-1],
            }
        )
    if args.json:
        print(
            json.dumps(
                {"model": model.model_name, "config": model.preset, "input_shape": list(shape), "exits": rows}, indent=2
            )
        )
        return 0
    print(
        f"{model.model_name} [{model.preset or 'custom'}] input {tuple(shape)}: cumulative cost per exit (one sample)"
    )
    header = f"{'exit':>4}  {'FLOPs (M)':>10}  {'MACs (M)':>9}  {'port MFLOPs':>11}  {'reference':>9}  {'diff':>7}  {'rel. cost':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ref_txt = "-" if r["reference_mflops"] is None else f"{r['reference_mflops']:.2f}"
        diff_txt = "-" if r["reference_rel_diff"] is None else f"{100 * r['reference_rel_diff']:+.2f}%"
        print(
            f"{r['exit']:>4}  {r['flops_m']:>10.2f}  {r['macs_m']:>9.2f}  {r['port_mflops']:>11.2f}  "
            f"{ref_txt:>9}  {diff_txt:>7}  {r['relative_cost']:>9.3f}"
        )
    print(
        "FLOPs: torch.utils.flop_counter (a multiply-add = 2 FLOPs); MACs = FLOPs/2; port MFLOPs: the MSDNet "
        "port's op counter (multiply-adds + ReLU outputs + pooled inputs + linear biases, BN free)."
    )
    if ref is not None:
        print(f"max |diff| vs reference: {100 * np.max(np.abs(port / 1e6 / ref - 1)):.2f}%")
    return 0

"""`pcee calibrate`: fit a policy (reliability maps and all) on val.npz and write it as JSON.

The JSON is ``policy.to_dict()`` (name, params, fitted state): ``policy_from_dict`` rebuilds it.
``--delta`` sets the policy's swept parameter (δ for PCEE, α for risk-controlled, τ, q, budget).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--outputs", required=True, help="outputs-contract directory (val.npz is used)")
    p.add_argument("--policy", required=True, help="policy name (pcee, pcee-ws, threshold, ...)")
    p.add_argument("--delta", type=float, default=None, help="value of the policy's parameter (δ, α, τ, q or budget); default: the policy's")
    p.add_argument("--score", default=None, help="confidence score: max_prob, entropy or margin")
    p.add_argument("--bins", type=int, default=None, help="reliability-map bins")
    p.add_argument("--min-count", type=float, default=None, help="minimum validation count for a bin to allow exits (plain PCEE)")
    p.add_argument("--out", required=True, help="JSON file to write")


def run(args: argparse.Namespace) -> int:
    from pcee.atomic import write_json_atomic
    from pcee.cli.sweep import resolve_policies
    from pcee.outputs import ExitOutputs
    from pcee.policies.registry import build_policy, get_policy_class

    names = resolve_policies(args.policy)
    if len(names) != 1 or args.policy.strip() == "all":
        raise ValueError("--policy takes exactly one policy name here")
    name = names[0]
    cls = get_policy_class(name)
    accepted = set(cls._param_names())
    params = {}
    for key, value in (("score", args.score), ("n_bins", args.bins), ("min_count", args.min_count)):
        if value is None:
            continue
        if key not in accepted:
            raise ValueError(f"policy {name!r} has no parameter {key!r}; its parameters: {', '.join(sorted(accepted)) or '(none)'}")
        params[key] = value
    if args.delta is not None:
        if cls.param_name is None:
            raise ValueError(f"policy {name!r} has no parameter to set with --delta")
        params[cls.param_name] = args.delta
    val_path = Path(args.outputs) / "val.npz"
    if not Path(args.outputs).is_dir():
        raise FileNotFoundError(f"outputs directory {args.outputs} does not exist")
    val = ExitOutputs.load(val_path)
    policy = build_policy(name, **params).fit(val.logits, val.labels, val.flops)

    out = write_json_atomic(args.out, policy.to_dict())
    param = cls.param_name
    shown = f" {param}={policy.get_params()[param]}" if param else ""
    print(f"fitted {name}{shown} on {len(val)} validation samples -> {out}")
    return 0

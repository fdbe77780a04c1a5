"""`pcee calibrate`: fit a policy (reliability maps and all) on val.npz and write it as JSON.

The JSON is ``policy.to_dict()`` (name, params, fitted state): ``policy_from_dict`` rebuilds it.

Two ways to set the policy's parameter (δ for PCEE, α for risk-controlled, τ, q, budget):

``--target α`` (or ``--budget F``)
    :func:`pcee.operating_point.choose_operating_point` on ``val.npz`` alone: the validation
    outputs are split (``--calibrate-fraction``, ``--seed``) into a fit part (the policy's maps)
    and a calibrate part (choosing the parameter and bounding its accuracy). ``--mode certified``
    (default) certifies accuracy >= α with probability >= 1 - η (``--risk``, ``--bound``);
    ``--mode point`` is a point estimate without guarantee; ``--mode budget`` keeps the mean
    relative cost within ``--budget`` with probability >= 1 - η. The certificate is written next to
    the policy as ``<out stem>.operating_point.json`` (``OperatingPoint.to_dict()``) and printed as
    a markdown table. ``test.npz`` is read only *after* the choice, when present, and its accuracy
    is reported as a check, never used for choosing. A target (or budget) that cannot be certified
    exits with code 2 and names the best certifiable accuracy and the number of calibrate rows.
``--delta v``
    The raw manual setting: the policy is fitted on all of val.npz at that value; no guarantee.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pcee.atomic import write_json_atomic
from pcee.cli.options import CHOICE_FLAGS, ChoiceSettings, add_choice_arguments, refuse_unused, resolve_policies
from pcee.latency import LatencyProfile, cost_vector, read_latency_profile, speedup_line
from pcee.operating_point import CHECK_LABEL, MODES, choose_operating_point
from pcee.outputs import ExitOutputs
from pcee.policies.registry import build_policy, get_policy_class

#: flags that only mean something when pcee chooses the operating point (--target / --budget)
CHOOSING_FLAGS = (("cost", "--cost"), ("latency_profile", "--latency-profile"), ("mode", "--mode"), *CHOICE_FLAGS)


def add_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument(
        "--outputs", required=True, help="outputs-contract directory (val.npz is used; test.npz only as a check)"
    )
    p.add_argument("--policy", required=True, help="policy name (pcee, pcee-ws, threshold, ...)")
    p.add_argument(
        "--delta",
        type=float,
        default=None,
        help="manual value of the policy's parameter (δ, α, τ, q or budget), no guarantee; default: the policy's",
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="target accuracy α in (0, 1): choose the parameter on the calibrate part of val.npz",
    )
    add_choice_arguments(p, "with --target or --budget")
    p.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="certified (default with --target), point (estimate, no guarantee) or budget (default with --budget)",
    )
    p.add_argument("--budget", type=float, default=None, help="mean relative cost budget in (0, 1] (mode budget)")
    p.add_argument("--score", default=None, help="confidence score: max_prob, entropy or margin")
    p.add_argument("--bins", type=int, default=None, help="reliability-map bins")
    p.add_argument(
        "--min-count", type=float, default=None, help="minimum validation count for a bin to allow exits (plain PCEE)"
    )
    p.add_argument(
        "--out", required=True, help="JSON file to write (with --target/--budget also <out stem>.operating_point.json)"
    )


def operating_point_path(out: str | Path) -> Path:
    """Where the certificate of ``--out`` goes: ``<out stem>.operating_point.json`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem if out.suffix == '.json' else out.name}.operating_point.json")


def run(args: argparse.Namespace) -> int:

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
            raise ValueError(
                f"policy {name!r} has no parameter {key!r}; its parameters: {', '.join(sorted(accepted)) or '(none)'}"
            )
        params[key] = value
    choosing = args.target is not None or args.budget is not None
    if choosing and args.delta is not None:
        raise ValueError("give either --delta (a manual point) or --target/--budget (pcee chooses), not both")
    if not choosing:
        refuse_unused(args, CHOOSING_FLAGS, "with --target or --budget")
    choice = ChoiceSettings.from_args(args)
    if args.budget is not None and not (math.isfinite(args.budget) and 0.0 < args.budget <= 1.0):
        raise ValueError(f"--budget must be a mean relative cost in (0, 1], got {args.budget}")
    if not Path(args.outputs).is_dir():
        raise FileNotFoundError(f"outputs directory {args.outputs} does not exist")
    val = ExitOutputs.load(Path(args.outputs) / "val.npz")

    if choosing:
        return _choose(args, name, params, val, choice)

    if args.delta is not None:
        if cls.param_name is None:
            raise ValueError(f"policy {name!r} has no parameter to set with --delta")
        params[cls.param_name] = args.delta
    policy = build_policy(name, **params).fit(val.logits, val.labels, val.flops)

    out = write_json_atomic(args.out, policy.to_dict())
    param = cls.param_name
    shown = f" {param}={policy.get_params()[param]}" if param else ""
    print(f"fitted {name}{shown} on {len(val)} validation samples -> {out}")
    print("manual point without guarantee (use --target to choose a certified operating point on validation)")
    return 0


def _choose(args: argparse.Namespace, name: str, params: dict, val, choice: ChoiceSettings) -> int:

    mode = args.mode or ("budget" if args.target is None else "certified")
    if mode == "budget" and args.budget is None:
        raise ValueError("--mode budget needs --budget")
    if mode != "budget" and args.target is None:
        raise ValueError(f"--mode {mode} needs --target")
    if mode != "budget" and args.budget is not None:
        raise ValueError(f"--budget applies to --mode budget only (mode is {mode})")
    risk, bound = choice.risk, choice.bound

    profile = read_latency_profile(args.latency_profile)
    cost_vec, cost = cost_vector(val.flops, profile, args.cost)
    # the choice sees the validation outputs only; test.npz is not even read before it is made
    op = choose_operating_point(
        name,
        val.with_cost(cost_vec),
        cost=cost,
        target_accuracy=args.target,
        flops_budget=args.budget,
        risk=risk,
        bound=bound,
        mode=mode,
        calibrate_fraction=choice.calibrate_fraction,
        seed=choice.seed,
        params=params,
        require_certified=(mode == "certified"),
    )
    if mode == "budget" and not op.certified:
        raise ValueError(
            f"no operating point of {name!r} keeps the mean relative cost within {args.budget} with probability "
            f">= {1 - risk:.2f} on {op.n_calibrate} calibrate rows ({bound} bound); raise the budget or the risk"
        )

    test_path = Path(args.outputs) / "test.npz"
    if test_path.exists():
        op = op.checked_on(ExitOutputs.load(test_path).with_cost(cost_vec))
    out = write_json_atomic(args.out, op.policy.to_dict())
    cert = write_json_atomic(
        operating_point_path(args.out),
        {**op.to_dict(), "chosen_on": "validation (calibrate part)", "test_accuracy_label": CHECK_LABEL},
    )
    print(op.markdown())
    print()
    if cost == "latency" and profile is not None and op.mean_flops is not None:
        print(speedup_line(LatencyProfile.from_dict(profile), op.mean_flops))
    if op.test_accuracy is not None:
        print(
            f"{CHECK_LABEL}: {op.test_accuracy:.4f} on {op.n_test} test rows (relative cost {op.test_relative_cost:.3f})"
        )
    shown = f" {op.param_name}={op.value:g}" if op.param_name and op.value is not None else ""
    print(
        f"fitted {name}{shown} on {op.n_fit} fit rows, chosen on {op.n_calibrate} calibrate rows of validation -> {out}, {cert}"
    )
    return 0

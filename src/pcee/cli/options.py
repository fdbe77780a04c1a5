"""Options that several `pcee` commands share: the policies named on the command line, and the flags
of choosing an operating point (α, η, bound, split, cost) with their checks and defaults."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from pcee.calibration.bounds import BOUNDS
from pcee.calibration.ltt import DEFAULT_BOUND, DEFAULT_CALIBRATE_FRACTION, DEFAULT_RISK
from pcee.policies.registry import POLICY_NAMES

#: the flags that only mean something when pcee chooses an operating point (with --target or --budget)
CHOICE_FLAGS = (
    ("risk", "--risk"),
    ("bound", "--bound"),
    ("calibrate_fraction", "--calibrate-fraction"),
    ("seed", "--seed"),
)


def resolve_policies(text: str) -> list[str]:
    """Registered policy names from ``a,b`` or ``all``; ValueError naming the unknown ones."""

    names = list(POLICY_NAMES) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in POLICY_NAMES]
    if bad or not names:
        raise ValueError(f"unknown policy {', '.join(bad) or text!r}; valid: {', '.join(POLICY_NAMES)} or all")
    return names


def check_unit_flag(flag: str, value: float | None) -> None:
    """ValueError naming the flag unless it is absent or in (0, 1)."""
    if value is not None and not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"{flag} must be in (0, 1), got {value}")


def add_choice_arguments(p: argparse.ArgumentParser, applies: str) -> None:
    """--risk, --bound, --calibrate-fraction, --seed, --latency-profile and --cost; ``applies`` says
    when they apply (e.g. "with --target"), for their help."""
    p.add_argument(
        "--risk",
        type=float,
        default=None,
        help=f"risk η in (0, 1): P(accuracy < α) <= η (default {DEFAULT_RISK}; {applies})",
    )
    p.add_argument(
        "--bound", choices=BOUNDS, default=None, help=f"concentration bound (default {DEFAULT_BOUND}; {applies})"
    )
    p.add_argument(
        "--calibrate-fraction",
        type=float,
        default=None,
        help=f"share of val.npz held out to choose and certify (default {DEFAULT_CALIBRATE_FRACTION}; {applies})",
    )
    p.add_argument("--seed", type=int, default=None, help=f"seed of the fit/calibrate split (default 0; {applies})")
    p.add_argument(
        "--latency-profile",
        default=None,
        help="a latency profile (JSON from `pcee profile --out`, or a bundle directory whose meta.json has one): "
        "cost is then counted in time",
    )
    p.add_argument(
        "--cost",
        choices=("flops", "latency"),
        default=None,
        help="what relative cost (and --budget) counts (default: latency with --latency-profile, else flops)",
    )


@dataclass(frozen=True)
class ChoiceSettings:
    """The checked choice flags with their defaults filled in."""

    risk: float
    bound: str
    calibrate_fraction: float
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ChoiceSettings:
        check_unit_flag("--target", getattr(args, "target", None))
        check_unit_flag("--risk", args.risk)
        check_unit_flag("--calibrate-fraction", args.calibrate_fraction)
        return cls(
            risk=DEFAULT_RISK if args.risk is None else args.risk,
            bound=args.bound or DEFAULT_BOUND,
            calibrate_fraction=DEFAULT_CALIBRATE_FRACTION
            if args.calibrate_fraction is None
            else args.calibrate_fraction,
            seed=0 if args.seed is None else args.seed,
        )


def refuse_unused(args: argparse.Namespace, flags: tuple[tuple[str, str], ...], needs: str) -> None:
    """ValueError naming the given flags among ``flags`` (attr, flag), which only apply ``needs``."""
    given = [flag for attr, flag in flags if getattr(args, attr, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply {needs}")

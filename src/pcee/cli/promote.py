"""``pcee promote --version N [--name pcee-digits-small-cnn]``: move ``champion`` to version N
(the old champion becomes ``previous``). The name may be omitted when the registry holds one model."""

from __future__ import annotations

import argparse

from pcee.registry.aliases import promote
from pcee.registry.tracking import resolve_model_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", required=True, help="model version to make champion")
    parser.add_argument("--name", help="registered model name (default: the only pcee-* model)")


def resolve_name(name: str | None) -> str:

    return resolve_model_name(name)


def run(args: argparse.Namespace) -> int:

    name = resolve_name(args.name)
    result = promote(name, args.version)
    print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in result.items()))
    return 0

"""``pcee rollback [--name NAME]``: swap ``champion`` and ``previous``."""

from __future__ import annotations

import argparse

from pcee.cli.promote import resolve_name
from pcee.registry.aliases import rollback


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="registered model name (default: the only pcee-* model)")


def run(args: argparse.Namespace) -> int:

    name = resolve_name(args.name)
    result = rollback(name)
    print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in result.items()))
    return 0

"""``python -m pcee.validation --data prepared:data [--report OUT.json]``: the dataset suite as a
command (the DVC ``validate`` stage). Exit code 1 and the failing expectations on failure."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pcee.data.datasets import load_dataset
from pcee.validation import ValidationFailed, validate_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pcee.validation", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--data", default="prepared:data", help="dataset name (default prepared:data)")
    parser.add_argument("--min-split-size", type=int, default=50)
    parser.add_argument(
        "--balance",
        type=float,
        nargs=2,
        default=(0.5, 2.0),
        metavar=("LO", "HI"),
        help="class share bounds, as multiples of 1/K",
    )
    parser.add_argument("--report", type=Path, help="write the validation report JSON here")
    args = parser.parse_args(argv)

    splits = load_dataset(args.data)
    try:
        report = validate_dataset(splits, args.min_split_size, tuple(args.balance)).to_dict()
        code = 0
    except ValidationFailed as err:
        print(err, file=sys.stderr)
        report = {"suite": err.suite, "success": False, "results": err.failures}
        code = 1
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.report.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        tmp.replace(args.report)
    if code == 0:
        print(f"{report['suite']}: {report['n_expectations']} expectations passed")
    return code


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pcee.serving ...``: the same as ``pcee serve ...``."""

import argparse
import sys

from pcee.cli import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcee.serving", description="serve the champion model over HTTP")
    serve.add_arguments(parser)
    try:
        return serve.run(parser.parse_args(argv))
    except ValueError as err:  # a bad setting: a clear message and a non-zero exit, as `pcee serve` does
        print(f"pcee serve: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

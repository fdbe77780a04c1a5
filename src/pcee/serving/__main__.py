"""``python -m pcee.serving ...``: the same as ``pcee serve ...``."""

import argparse
import sys

from pcee.cli import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcee.serving", description="serve the champion model over HTTP")
    serve.add_arguments(parser)
    return serve.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

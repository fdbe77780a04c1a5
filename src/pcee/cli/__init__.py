"""`pcee` command line. Each subcommand lives in its own module ``pcee.cli.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their command
runs, so `pcee sweep` never pays for importing MLflow or Prefect.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("pcee.cli.data", "prepare and inspect datasets"),
    "flops": ("pcee.cli.flops", "print a model's cumulative per-exit FLOPs"),
    "profile": ("pcee.cli.profile", "measure a bundle's per-exit latency on this machine and store it"),
    "train": ("pcee.cli.train", "train a multi-exit model and write the outputs contract"),
    "calibrate": ("pcee.cli.calibrate", "fit reliability maps / a policy on val outputs, write JSON"),
    "sweep": ("pcee.cli.sweep", "sweep delta (or a baseline's parameter) on test outputs"),
    "promote": ("pcee.cli.promote", "move the registry's champion alias to a version"),
    "rollback": ("pcee.cli.rollback", "move champion back to the previous version"),
    "serve": ("pcee.cli.serve", "serve the registry's champion over HTTP"),
    "traffic": ("pcee.cli.traffic", "send real HTTP traffic (optionally corrupted) to the service"),
}


def parse_model_config(text: str | None) -> tuple[str | None, dict]:
    """``--config`` of a model: a preset name, or a JSON object of config overrides (text starting with "{").

    Returns ``(preset, overrides)``: ``("cifar10", {})`` or ``(None, {...})`` (the default preset, overridden).
    """
    import json

    if text is None or not text.lstrip().startswith("{"):
        return text, {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--config looks like JSON but is not valid JSON: {err}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--config JSON must be an object of config overrides, got {text!r}")
    return None, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pcee", description="pcee: Performance Control Early Exiting")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = argv[0] if argv else None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == wanted:
            try:
                importlib.import_module(module_name).add_arguments(p)
            except ModuleNotFoundError as err:
                if err.name != module_name:
                    raise
                parser.error(f"command {name!r} is not available in this build")
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Bad input: a clear message and a non-zero exit, no traceback for the operator.
        print(f"pcee {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

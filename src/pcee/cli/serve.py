"""`pcee serve`: the HTTP service for the registry's champion (or a local bundle directory).

Every option's default and limits are a field of :class:`pcee.settings.Settings` (``PCEE_SERVE_*``):
an option given on the command line replaces that variable, and the service's config is built from
the result (:meth:`pcee.serving.app.ServeConfig.from_settings`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pcee.inference.allocator import keep_freed_memory_as_set
from pcee.selective import ANSWER_MODES
from pcee.serving.app import ServeConfig
from pcee.serving.model_source import LocalBundleSource, MlflowAliasSource, RegistryUnavailableError
from pcee.serving.server import serve
from pcee.settings import Settings
from pcee.traffic.store import TrafficStore

#: option dest -> the Settings field it replaces (its default and limits are written there)
OPTION_SETTINGS = {
    "host": "serve_host",
    "port": "serve_port",
    "model_name": "model_name",
    "store_fraction": "serve_store_fraction",
    "max_batch": "serve_max_batch",
    "max_wait_ms": "serve_max_wait_ms",
    "max_body_bytes": "serve_max_body_bytes",
    "poll_interval": "serve_poll_s",
    "seed": "serve_seed",
    "answer_mode": "serve_answer_mode",
    "fallback_url": "serve_fallback_url",
    "fallback_timeout_s": "serve_fallback_timeout_s",
    "shadow_fraction": "serve_shadow_fraction",
    "device": "serve_device",
    "graphs": "serve_graphs",
}


def _shape(text: str) -> tuple[int, int, int]:
    parts = [p for p in text.replace("x", ",").split(",") if p]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"input shape must be C,H,W (e.g. 1,8,8), got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _default(dest: str) -> str:
    """``$PCEE_X or <default>`` for an option's help."""
    key = OPTION_SETTINGS[dest]
    return f"${key.upper() if key == 'model_name' else 'PCEE_' + key.upper()} or {Settings.model_fields[key].default}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `pcee serve`; unset options take the environment's value (:mod:`pcee.settings`)."""
    p.add_argument("--host", help=f"bind address (default {_default('host')})")
    p.add_argument("--port", type=int, help=f"port (default {_default('port')})")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model-name", help="registered model name, e.g. pcee-digits-small-cnn (default $PCEE_MODEL_NAME)"
    )
    src.add_argument("--bundle", help="serve a local bundle directory instead of the registry (tests, offline)")
    p.add_argument("--alias", default="champion", help="registry alias to serve and follow (default champion)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--traffic-url",
        default=None,
        help="traffic store URL (default $PCEE_TRAFFIC_URL or sqlite under $PCEE_STATE_DIR)",
    )
    p.add_argument("--no-log", action="store_true", help="do not log requests (only to measure the cost of logging)")
    p.add_argument(
        "--store-fraction",
        type=float,
        help=f"fraction of inputs stored for recalibration ({_default('store_fraction')})",
    )
    p.add_argument("--device", help=f"where the model runs: cpu, cuda or cuda:<index> ({_default('device')})")
    p.add_argument("--graphs", action="store_true", default=None, help="cuda: CUDA graphs per segment and batch bucket")
    p.add_argument("--max-batch", type=int, help=f"most samples per micro-batch ({_default('max_batch')}; 256 on cuda)")
    p.add_argument(
        "--max-wait-ms", type=float, help=f"wait for more requests after the first ({_default('max_wait_ms')})"
    )
    p.add_argument("--max-body-bytes", type=int, help=f"request size limit ({_default('max_body_bytes')})")
    p.add_argument(
        "--poll-interval",
        type=float,
        help=f"registry alias poll in seconds, 0 disables reload ({_default('poll_interval')})",
    )
    p.add_argument("--input-shape", type=_shape, default=None, help="override the bundle's input shape C,H,W")
    p.add_argument("--seed", type=int, help="seed of the input-storage and shadow sampling ($PCEE_SERVE_SEED)")
    p.add_argument(
        "--answer-mode",
        help=f"what happens to a request below the bundle's answer threshold rho: {' | '.join(ANSWER_MODES)} "
        f"({_default('answer_mode')}: best guess flagged abstained; defer forwards it to --fallback-url)",
    )
    p.add_argument("--fallback-url", help="base URL of the pcee service deferred requests go to (answer mode defer)")
    p.add_argument(
        "--fallback-timeout-s",
        type=float,
        help=f"longest wait for the fallback's answer ({_default('fallback_timeout_s')})",
    )
    p.add_argument(
        "--shadow-fraction",
        type=float,
        help="fraction of requests also run to the final exit, inputs stored, for label-free recalibration "
        f"({_default('shadow_fraction')})",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    given = {key: getattr(args, dest) for dest, key in OPTION_SETTINGS.items() if getattr(args, dest) is not None}
    settings = Settings(**given)  # a bad value fails here, naming the variable the option replaces
    if keep_freed_memory_as_set():  # before the model's first run
        logging.getLogger("pcee.serving").info("keeping freed memory in the process (PCEE_KEEP_FREED_MEMORY)")
    if args.bundle:
        source = LocalBundleSource(args.bundle)
    else:
        name = settings.model_name
        if not name:
            raise ValueError("give --model-name NAME (e.g. pcee-digits-small-cnn) or --bundle DIR")
        source = MlflowAliasSource(name, alias=args.alias, tracking_uri=args.tracking_uri)
    config = ServeConfig.from_settings(settings, log_requests=not args.no_log, input_shape=args.input_shape)
    store = TrafficStore.from_settings(settings, url=args.traffic_url)
    try:
        serve(config, source, store)
    except RegistryUnavailableError as err:
        print(f"pcee serve: refusing to start: no model to serve: {err}", file=sys.stderr)
        return 3
    return 0

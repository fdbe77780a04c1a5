"""`pcee serve`: the HTTP service for the registry's champion (or a local bundle directory)."""

from __future__ import annotations

import argparse
import logging
import sys

from pcee.selective import ANSWER_MODES
from pcee.settings import Settings

#: the micro-batcher's largest batch per device: on a CPU a batch's time grows with its rows, so a
#: request waits less in small batches; on a GPU it grows far less than the rows until the device
#: fills, so the batcher takes what is queued up to the runner's batch
MAX_BATCH = {"cpu": 64, "cuda": 256}


def _shape(text: str) -> tuple[int, int, int]:
    parts = [p for p in text.replace("x", ",").split(",") if p]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"input shape must be C,H,W (e.g. 1,8,8), got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `pcee serve`; defaults from the environment (:mod:`pcee.settings`, ``PCEE_SERVE_*``)."""
    env = Settings()
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=env.serve_port, help="port (default $PCEE_SERVE_PORT or 8000)")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model-name",
        default=env.model_name,
        help="registered model name, e.g. pcee-digits-small-cnn (default $PCEE_MODEL_NAME)",
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
        default=env.serve_store_fraction,
        help="fraction of inputs stored for recalibration (default 0.1)",
    )
    p.add_argument("--device", default=env.serve_device, help="cpu (default), cuda or cuda:<index>")
    p.add_argument("--graphs", action="store_true", default=env.serve_graphs, help="cuda: CUDA graphs per batch bucket")
    p.add_argument("--max-batch", type=int, default=None, help=f"most samples per micro-batch (default {MAX_BATCH})")
    p.add_argument(
        "--max-wait-ms", type=float, default=2.0, help="wait for more requests after the first (default 2 ms)"
    )
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request size limit (default 1 MB)")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=env.serve_poll_s,
        help="registry alias poll in seconds; 0 disables reload",
    )
    p.add_argument("--input-shape", type=_shape, default=None, help="override the bundle's input shape C,H,W")
    p.add_argument("--seed", type=int, default=None, help="seed of the input-storage and shadow sampling")
    p.add_argument(
        "--answer-mode",
        default=env.serve_answer_mode,
        help=f"what happens to a request below the bundle's answer threshold rho: {' | '.join(ANSWER_MODES)} "
        f"(default {env.serve_answer_mode}: best guess flagged abstained; defer forwards it to --fallback-url)",
    )
    p.add_argument(
        "--fallback-url",
        default=env.serve_fallback_url,
        help="base URL of the pcee service deferred requests go to (answer mode defer)",
    )
    p.add_argument(
        "--fallback-timeout-s",
        type=float,
        default=env.serve_fallback_timeout_s,
        help="longest wait for the fallback's answer (default 2 s)",
    )
    p.add_argument(
        "--shadow-fraction",
        type=float,
        default=env.serve_shadow_fraction,
        help="fraction of requests also run to the final exit, inputs stored, for label-free recalibration (default 0.02)",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pcee.inference.allocator import keep_freed_memory_as_set
    from pcee.serving.app import ServeConfig
    from pcee.serving.model_source import LocalBundleSource, MlflowAliasSource, RegistryUnavailableError
    from pcee.serving.server import serve
    from pcee.traffic.store import TrafficStore

    if keep_freed_memory_as_set():  # before the model's first run
        logging.getLogger("pcee.serving").info("keeping freed memory in the process (PCEE_KEEP_FREED_MEMORY)")
    if args.bundle:
        source = LocalBundleSource(args.bundle)
    else:
        name = args.model_name
        if not name:
            raise ValueError("give --model-name NAME (e.g. pcee-digits-small-cnn) or --bundle DIR")
        source = MlflowAliasSource(name, alias=args.alias, tracking_uri=args.tracking_uri)
    config = ServeConfig(
        host=args.host,
        port=args.port,
        max_batch=args.max_batch or MAX_BATCH["cuda" if args.device.startswith("cuda") else "cpu"],
        max_wait_ms=args.max_wait_ms,
        max_body_bytes=args.max_body_bytes,
        store_fraction=args.store_fraction,
        poll_interval_s=args.poll_interval,
        log_requests=not args.no_log,
        input_shape=args.input_shape,
        seed=args.seed,
        answer_mode=args.answer_mode,
        fallback_url=args.fallback_url or None,
        fallback_timeout_s=args.fallback_timeout_s,
        shadow_fraction=args.shadow_fraction,
        device=args.device,
        graphs=args.graphs,
    ).validate()
    store = TrafficStore(args.traffic_url)
    try:
        serve(config, source, store)
    except RegistryUnavailableError as err:
        print(f"pcee serve: refusing to start: no model to serve: {err}", file=sys.stderr)
        return 3
    return 0

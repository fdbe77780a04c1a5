"""Run the service under uvicorn: load the model first, then bind (127.0.0.1 by default)."""

from __future__ import annotations

import logging
import signal
import threading

import uvicorn

from pcee.serving.app import ServeConfig, Service, create_app
from pcee.serving.model_source import ModelSource
from pcee.traffic.store import TrafficStore

log = logging.getLogger("pcee.serving")


def serve(config: ServeConfig, source: ModelSource, store: TrafficStore | None) -> None:
    """Start the service and block until it is stopped (SIGINT/SIGTERM).

    Raises :class:`~pcee.serving.model_source.RegistryUnavailableError` before binding the port
    when the model cannot be loaded: a service without a model refuses to start.
    """
    service = Service(config, source, store)
    # SIGHUP: look at the model source now (the fleet's coordinator reloads replicas one at a time)
    if threading.current_thread() is threading.main_thread():  # only there can a handler be set
        signal.signal(signal.SIGHUP, lambda _sig, _frame: service.request_reload())
    service.start()
    app = create_app(service)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False, lifespan="off")
    )
    print(
        f"pcee serve: model {service.served.version} (policy {service.served.policy_name}, delta {service.served.delta}) "
        f"from {source.description}; listening on http://{config.host}:{config.port}",
        flush=True,
    )
    try:
        server.run()
    finally:
        service.stop()
        if store is not None:
            store.dispose()

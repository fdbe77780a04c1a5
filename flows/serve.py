"""One process serving every pcee deployment (``make up`` starts it: ``python -m flows.serve``):

- ``calibrate/nightly``: cron ``PCEE_NIGHTLY_CRON`` (default 02:00), concurrency limit 1;
- ``train/manual``: run on demand (``prefect deployment run train/manual``);
- ``monitor/<interval>``: the drift check of the champion's traffic (flows/monitor.py);
- ``recalibrate/drift-alert``: with its event trigger on ``pcee.drift.detected`` (flows/recalibrate.py).

A new flow module adds itself by defining ``deployments() -> list`` and being listed in
:data:`DEPLOYMENT_MODULES`: an explicit list, so what ``make up`` serves is read here, not discovered.
"""

from __future__ import annotations

from prefect import serve

from flows import calibrate as calibrate_flow
from flows import monitor as monitor_flow
from flows import recalibrate as recalibrate_flow
from flows import train as train_flow
from flows._common import MODULE_PATH
from pcee.settings import Settings


def core_deployments(settings: Settings | None = None) -> list:
    cron = (settings or Settings()).nightly_cron
    return [
        calibrate_flow.calibrate.to_deployment(
            name="nightly",
            entrypoint_type=MODULE_PATH,
            cron=cron,
            concurrency_limit=1,
            description="recalibrate @champion on the latest validation data, sweep δ, register, gate, promote",
        ),
        train_flow.train.to_deployment(
            name="manual",
            entrypoint_type=MODULE_PATH,
            description="version data, validate, train, calibrate, sweep, register, gate, promote",
        ),
    ]


#: flow modules whose ``deployments()`` the process serves beside the core ones
DEPLOYMENT_MODULES = (monitor_flow, recalibrate_flow)


def all_deployments() -> list:
    return core_deployments() + [d for module in DEPLOYMENT_MODULES for d in module.deployments()]


if __name__ == "__main__":
    serve(*all_deployments(), limit=Settings().serve_limit)

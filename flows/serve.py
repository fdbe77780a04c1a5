"""One process serving every pcee deployment (``make up`` starts it):

- ``calibrate/nightly``: cron 02:00, concurrency limit 1;
- ``train/manual``: run on demand (``prefect deployment run train/manual``).

Other parts add theirs by appending to ``DEPLOYMENT_FACTORIES`` (see ``extra_deployments``): each
factory returns ``flow.to_deployment(...)`` objects. Monitoring registers ``monitor/<interval>``
and ``recalibrate/drift-alert`` from ``flows/monitor.py`` / ``flows/recalibrate.py`` if present.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Callable

FLOWS = Path(__file__).resolve().parent
sys.path.insert(0, str(FLOWS))
sys.path.insert(0, str(FLOWS.parent))

from prefect import serve  # noqa: E402

NIGHTLY_CRON = os.environ.get("PCEE_NIGHTLY_CRON", "0 2 * * *")


def core_deployments() -> list:
    from calibrate import calibrate
    from train import train

    return [
        calibrate.to_deployment(name="nightly", cron=NIGHTLY_CRON, concurrency_limit=1,
                                description="recalibrate @champion on the latest validation data, sweep δ, register, gate, promote"),
        train.to_deployment(name="manual", description="version data, validate, train, calibrate, sweep, register, gate, promote"),
    ]


def extra_deployments() -> list:
    """Deployments from other parts: a module ``flows/<name>.py`` defining ``deployments() -> list``."""
    out = []
    for path in sorted(FLOWS.glob("*.py")):
        if path.stem.startswith("_") or path.stem in ("serve", "train", "calibrate"):
            continue
        # a plain import (flows/ is on sys.path): Prefect finds the flow's file from its module
        module = importlib.import_module(path.stem)
        if hasattr(module, "deployments"):
            out.extend(module.deployments())
    return out


DEPLOYMENT_FACTORIES: list[Callable[[], list]] = [core_deployments, extra_deployments]


def all_deployments() -> list:
    return [d for factory in DEPLOYMENT_FACTORIES for d in factory()]


if __name__ == "__main__":
    serve(*all_deployments(), limit=int(os.environ.get("PCEE_SERVE_LIMIT", "2")))

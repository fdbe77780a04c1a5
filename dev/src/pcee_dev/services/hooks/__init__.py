"""The services the engines and serving add to ``make up`` (after Prefect, MLflow and the serve
process): each module's ``specs(cfg) -> list[dict]`` (keys as
:class:`pcee_dev.services.manager.ServiceSpec`), in this order."""

from __future__ import annotations

from typing import Any

HOOKS = ("postgres", "s3", "dask", "serving")


def specs(cfg: Any) -> list[dict]:
    import importlib

    out: list[dict] = []
    for name in HOOKS:
        out += importlib.import_module(f"{__name__}.{name}").specs(cfg)
    return out

"""Checkpoints: a ``state_dict`` (``model.pt``) plus the architecture (``model.json``: name, config).

Loading rebuilds the model with ``build_model(name, **config)`` and reads the weights with
``weights_only=True``, so a checkpoint file never runs code of its own on load. The name may be a
registry name, an import path ``"package.module:ClassName"`` or a ``"pcee.models"`` entry point
(docs/models.md); for the last two, loading imports that installed module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pcee.atomic import atomic_file, write_text_atomic
from pcee.models.base import MultiExitModel

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model.json"
FORMAT_VERSION = 1


def _paths(dir_or_path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, config) paths: ``X.pt`` -> (X.pt, X.json); a directory -> (dir/model.pt, dir/model.json)."""
    p = Path(dir_or_path)
    if p.suffix == ".pt":
        return p, p.with_suffix(".json")
    return p / WEIGHTS_FILE, p / CONFIG_FILE


def model_spec(model: MultiExitModel) -> dict[str, Any]:
    """The JSON that rebuilds ``model``'s architecture with ``build_model(name, **config)``."""
    name = getattr(model, "model_name", "")
    if not name:
        raise ValueError(
            f"{type(model).__name__} has no model_name; only models built with pcee.models.registry.build_model "
            "(a registry name, an import path 'package.module:ClassName' or a 'pcee.models' entry point) can be checkpointed"
        )
    return {
        "format": FORMAT_VERSION,
        "name": name,
        "config": dict(getattr(model, "config", {}) or {}),
        "num_exits": model.num_exits,
    }


def save_checkpoint(dir_or_path: str | os.PathLike, model: MultiExitModel) -> tuple[Path, Path]:
    """Write weights and architecture; returns (weights path, config path). Each file is written atomically."""
    weights, config = _paths(dir_or_path)
    spec = model_spec(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_file(weights) as tmp:
        torch.save(state, tmp)
    write_text_atomic(config, json.dumps(spec, indent=2, sort_keys=True))
    return weights, config


def load_checkpoint(dir_or_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> MultiExitModel:
    """Rebuild the model from ``model.json`` and load ``model.pt`` (``weights_only=True``); returned in eval mode."""
    from pcee.models.registry import build_model  # the registry imports every architecture: only when needed

    weights, config = _paths(dir_or_path)
    for path in (weights, config):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} not found (expected {WEIGHTS_FILE} + {CONFIG_FILE})")
    spec = json.loads(config.read_text())
    if "name" not in spec:
        raise ValueError(f"{config} has no 'name'; expected {{'name': ..., 'config': {{...}}}}")
    model = build_model(spec["name"], **spec.get("config", {}))
    state = torch.load(weights, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval()

"""Multi-exit architectures, their registry and their per-exit cost.

``build_model(name, preset=None, **overrides)`` builds any registered model; the architectures
(small-cnn, msdnet, vit, resnet18) are imported on first use of the registry. ``name`` may also be an
import path ``"package.module:ClassName"`` or a ``"pcee.models"`` entry point: a network of the
user's own, checked by :func:`pcee.models.contract.check_model` (docs/models.md).
"""

from pcee.models.base import MultiExitModel, index_state
from pcee.models.contract import ContractError, check_model
from pcee.models.registry import build_model, list_models, list_presets, register_model

__all__ = [
    "MultiExitModel",
    "index_state",
    "build_model",
    "list_models",
    "list_presets",
    "register_model",
    "ContractError",
    "check_model",
]

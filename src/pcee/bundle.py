"""A deployable model bundle: weights, architecture, fitted policy (maps and δ), FLOPs, metadata.

Directory layout (plain files any tool can read; weights load with ``weights_only=True``)::

    weights.pt      state_dict of the model (torch.save)
    model.json      {"name": model name, "config": build_model kwargs}; the name is a registry name,
                    an import path "package.module:ClassName" or a "pcee.models" entry point
                    (docs/models.md): loading imports that module, so it must be installed where the
                    bundle is loaded
    policy.json     policy.to_dict() (name, params, fitted state)
    flops.json      cumulative F_l per exit (list of L floats)
    meta.json       free metadata (dataset, input_shape, data version, ...)
    reference.npz   optional: validation outputs (the outputs contract), for monitoring

This is what the MLflow pyfunc wraps and what the HTTP service serves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcee.atomic import atomic_directory, write_json_atomic
from pcee.inference.runner import EarlyExitRunner
from pcee.latency import LatencyProfile
from pcee.models.base import MultiExitModel
from pcee.models.registry import build_model
from pcee.outputs import ExitOutputs
from pcee.policies.estimator import PolicyEstimator
from pcee.policies.registry import policy_from_dict

BUNDLE_FILES = ("weights.pt", "model.json", "policy.json", "flops.json", "meta.json")


class ModelBundle:
    """A multi-exit model with its fitted exit policy and per-exit cost."""

    def __init__(
        self, model: MultiExitModel, policy: PolicyEstimator, flops: np.ndarray, meta: dict[str, Any] | None = None
    ) -> None:
        flops = np.asarray(flops, dtype=np.float64)
        if flops.shape != (model.num_exits,):
            raise ValueError(
                f"flops must be ({model.num_exits},) for a model with {model.num_exits} exits, got shape {flops.shape}"
            )
        if not getattr(model, "model_name", ""):
            raise ValueError(
                f"the model ({type(model).__name__}) has no model_name: build it with "
                "pcee.models.registry.build_model(name, **config) so it can be rebuilt, where name is a registry name, "
                "an import path 'package.module:ClassName' or a 'pcee.models' entry point (docs/models.md)"
            )
        self.model = model
        self.policy = policy
        self.flops = flops
        self.meta = dict(meta or {})

    def runner(self, batch_size: int = 256, device: str | torch.device = "cpu", **options: Any):
        """An :class:`~pcee.inference.runner.EarlyExitRunner` for this bundle (``options``: the runner's
        keyword options), with the bundle's latency profile (``pcee profile``) where it has one."""

        stored = self.meta.get("latency_profile")
        profile = LatencyProfile.from_dict(stored) if isinstance(stored, dict) else None
        return EarlyExitRunner(
            self.model, self.policy, self.flops, batch_size=batch_size, device=device, profile=profile, **options
        )

    def save(self, out_dir: str | os.PathLike, reference: ExitOutputs | None = None) -> Path:
        """Write the bundle directory atomically (temporary sibling, then rename); returns its path."""
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            torch.save(state, tmp / "weights.pt")
            write_json_atomic(tmp / "model.json", {"name": self.model.model_name, "config": self.model.config})
            write_json_atomic(tmp / "policy.json", self.policy.to_dict())
            write_json_atomic(tmp / "flops.json", [float(f) for f in self.flops])
            write_json_atomic(tmp / "meta.json", self.meta)
            if reference is not None:
                reference.save(tmp / "reference.npz")
        return out_dir

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> ModelBundle:
        """Rebuild a saved bundle: the architecture from model.json (``build_model(name, **config)``,
        which imports a user model's module), weights with weights_only=True."""

        bundle_dir = Path(bundle_dir)
        if not bundle_dir.is_dir():
            raise FileNotFoundError(f"bundle directory {bundle_dir} does not exist")
        missing = [f for f in BUNDLE_FILES if not (bundle_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"bundle {bundle_dir} lacks {', '.join(missing)} (a bundle has {', '.join(BUNDLE_FILES)})"
            )
        spec = _read_json(bundle_dir / "model.json")
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"{bundle_dir / 'model.json'} must hold {{'name': ..., 'config': {{...}}}}")
        model = build_model(spec["name"], **(spec.get("config") or {}))
        state = torch.load(bundle_dir / "weights.pt", map_location=map_location, weights_only=True)
        model.load_state_dict(state)
        model.eval()
        policy = policy_from_dict(_read_json(bundle_dir / "policy.json"))
        flops = np.asarray(_read_json(bundle_dir / "flops.json"), dtype=np.float64)
        meta = _read_json(bundle_dir / "meta.json")
        return cls(model, policy, flops, meta)

    @staticmethod
    def load_reference(bundle_dir: str | os.PathLike) -> ExitOutputs | None:
        """The bundle's validation outputs, or None when it was saved without them."""
        path = Path(bundle_dir) / "reference.npz"
        return ExitOutputs.load(path) if path.is_file() else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None

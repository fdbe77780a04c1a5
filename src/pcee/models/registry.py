"""Model registry: build any multi-exit architecture by name (timm/torchvision style).

Each architecture registers its class together with a config dataclass and named presets::

    @register_model("small-cnn", config_cls=SmallCNNConfig, presets={"digits": {...}}, default_preset="digits")
    class SmallCNN(MultiExitModel): ...

``build_model(name, preset=None, **overrides)`` starts from the preset's values (the default preset
when none is given), applies ``overrides``, validates them through the config dataclass and returns
the model with ``model.model_name`` and ``model.config`` (the resolved, JSON-serialisable config)
set, so ``build_model(model.model_name, **model.config)`` rebuilds the same architecture.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from pcee.models.base import MultiExitModel

# The architectures shipped with pcee; imported on first use so `import pcee.models.registry` is cheap
# and free of import cycles (each of these modules imports `register_model` from here).
_BUILTIN_MODULES = (
    "pcee.models.small_cnn",
    "pcee.models.msdnet",
    "pcee.models.vit",
    "pcee.models.resnet",
)


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one architecture."""

    name: str
    model_cls: type[MultiExitModel]
    config_cls: type
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_preset: str | None = None


_REGISTRY: dict[str, ModelSpec] = {}
_builtins_loaded = False


def register_model(
    name: str,
    *,
    config_cls: type,
    presets: dict[str, dict[str, Any]] | None = None,
    default_preset: str | None = None,
) -> Callable[[type[MultiExitModel]], type[MultiExitModel]]:
    """Class decorator adding a ``MultiExitModel`` subclass (built as ``cls(config)``) to the registry."""
    presets = dict(presets or {})
    if default_preset is not None and default_preset not in presets:
        raise ValueError(f"default preset {default_preset!r} of model {name!r} is not one of {sorted(presets)}")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls of model {name!r} must be a dataclass, got {config_cls!r}")

    def decorator(cls: type[MultiExitModel]) -> type[MultiExitModel]:
        if name in _REGISTRY and _REGISTRY[name].model_cls is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name].model_cls.__name__}")
        _REGISTRY[name] = ModelSpec(name, cls, config_cls, presets, default_preset)
        cls.model_name = name
        return cls

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _builtins_loaded = True


def _spec(name: str) -> ModelSpec:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return _REGISTRY[name]


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def list_presets(name: str) -> list[str]:
    """Preset (config) names of model ``name``, sorted."""
    return sorted(_spec(name).presets)


def default_preset(name: str) -> str | None:
    """The preset ``build_model(name)`` starts from."""
    return _spec(name).default_preset


def config_fields(name: str) -> list[str]:
    """The keyword overrides ``build_model(name, ...)`` accepts."""
    return [f.name for f in dataclasses.fields(_spec(name).config_cls)]


def resolve_config(name: str, preset: str | None = None, **overrides: Any) -> Any:
    """The validated config dataclass for ``name``: preset values, then ``overrides``."""
    spec = _spec(name)
    preset = spec.default_preset if preset is None else preset
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in spec.presets:
            raise ValueError(
                f"unknown config {preset!r} for model {name!r}; valid configs: {', '.join(sorted(spec.presets))}"
            )
        values.update(spec.presets[preset])
    valid = config_fields(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; valid options: {', '.join(valid)}")
    values.update(overrides)
    return spec.config_cls(**values)  # the dataclass's __post_init__ validates values


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain JSON-serialisable dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def build_model(name: str, preset: str | None = None, **overrides: Any) -> MultiExitModel:
    """Build registered model ``name`` from ``preset`` (default preset if None) plus ``overrides``.

    Raises ``ValueError`` naming the valid models, configs or options when one is unknown.
    """
    spec = _spec(name)
    config = resolve_config(name, preset, **overrides)
    model = spec.model_cls(config)
    model.model_name = name
    model.config = config_to_dict(config)
    # the preset this exact architecture is (None when overrides changed it): for reference lookups
    base = spec.default_preset if preset is None else preset
    model.preset = base if base is not None and config_to_dict(resolve_config(name, base)) == model.config else None
    return model


def data_overrides(name: str, input_shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
    """Config overrides that fit model ``name`` to a dataset: its classes, channels and image size.

    Every registered config has ``num_classes``, ``in_chans`` and ``img_size``; this is the one
    place that maps a dataset's shape onto them.
    """
    channels, height, _ = input_shape
    wanted = {"num_classes": int(num_classes), "in_chans": int(channels), "img_size": int(height)}
    fields = set(config_fields(name))
    return {key: value for key, value in wanted.items() if key in fields}


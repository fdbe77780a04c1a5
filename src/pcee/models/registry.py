"""Model registry: build any multi-exit architecture by name (timm/torchvision style).

Each architecture shipped with pcee registers its class together with a config dataclass and named presets::

    @register_model("small-cnn", config_cls=SmallCNNConfig, presets={"digits": {...}}, default_preset="digits")
    class SmallCNN(MultiExitModel): ...

``build_model(name, preset=None, **overrides)`` starts from the preset's values (the default preset
when none is given), applies ``overrides``, validates them through the config dataclass and returns
the model with ``model.model_name`` and ``model.config`` (the resolved, JSON-serialisable config)
set, so ``build_model(model.model_name, **model.config)`` rebuilds the same architecture.

A model of the user's own needs no edit of pcee (docs/models.md). ``name`` may be

- a registry name (``"small-cnn"``): the built-in architectures, and anything a ``register_model``
  decorator added;
- an import path ``"package.module:ClassName"`` (the ``:`` tells it apart);
- an entry point name in the group ``"pcee.models"`` of an installed distribution
  (``[project.entry-points."pcee.models"] my-net = "my_pkg.nets:MyNet"``); a registry name wins
  over an entry point of the same name.

A user class is built as ``cls(config_cls(**config))`` when it declares a dataclass ``config_cls``
(like the registered models), else as ``cls(**config)`` with JSON-serialisable keyword arguments;
optional class attributes ``presets`` ({name: kwargs}) and ``default_preset`` work as for registered
models. ``model.model_name`` is the name it was built by (the import path or entry point name), so
model.json, checkpoints, bundles and the service import and rebuild it. A user model is checked
against the multi-exit contract when it is built (:mod:`pcee.models.contract`; the whole check
when its config names ``in_chans`` and ``img_size``, the static part otherwise).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from torch import nn

from pcee.models.base import MultiExitModel
from pcee.models.contract import check_model, check_model_static

# The architectures shipped with pcee; imported on first use so `import pcee.models.registry` is cheap
# and free of import cycles (each of these modules imports `register_model` from here).
_BUILTIN_MODULES = (
    "pcee.models.small_cnn",
    "pcee.models.msdnet",
    "pcee.models.vit",
    "pcee.models.resnet",
    "pcee.models.backbone",
)


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one architecture."""

    name: str
    model_cls: type[MultiExitModel]
    config_cls: type | None  # None: a user class built as cls(**config)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_preset: str | None = None
    source: str = "registry"  # "registry", "import path" or "entry point"


_REGISTRY: dict[str, ModelSpec] = {}
_M = TypeVar("_M", bound=MultiExitModel)
_builtins_loaded = False


def register_model(
    name: str,
    *,
    config_cls: type,
    presets: dict[str, dict[str, Any]] | None = None,
    default_preset: str | None = None,
) -> Callable[[type[_M]], type[_M]]:
    """Class decorator adding a ``MultiExitModel`` subclass (built as ``cls(config)``) to the registry."""
    presets = dict(presets or {})
    if default_preset is not None and default_preset not in presets:
        raise ValueError(f"default preset {default_preset!r} of model {name!r} is not one of {sorted(presets)}")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls of model {name!r} must be a dataclass, got {config_cls!r}")

    def decorator(cls: type[_M]) -> type[_M]:
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


ENTRY_POINT_GROUP = "pcee.models"
_USER_SPECS: dict[str, ModelSpec] = {}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Entry points of the group ``pcee.models`` by name (the first of duplicate names)."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def _import_path(path: str) -> Any:
    """The object at ``"package.module:Attr"`` (``Attr`` may be dotted); ValueError naming what failed."""
    module_name, _, attr = path.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not module_name or not attr:
        raise ValueError(f"model import path {path!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = f"module {err.name!r}" if err.name and err.name != module_name else "it"
        raise ValueError(
            f"cannot import module {module_name!r} of model {path!r}: {missing} is not installed ({err})"
        ) from err
    except Exception as err:  # noqa: BLE001 - a broken user module: say which and why
        raise ValueError(
            f"importing module {module_name!r} of model {path!r} failed: {type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (model {path!r})") from None
    return obj


def _user_spec(name: str, cls: Any, source: str) -> ModelSpec:
    """A ModelSpec for a user class found by import path or entry point."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(
            f"model {name!r} ({source}) is {cls!r}, not a torch.nn.Module class implementing the multi-exit "
            "contract (subclass pcee.models.base.MultiExitModel; docs/models.md)"
        )
    # held to the multi-exit contract structurally: checked when built (_check_user_model)
    model_cls = cast("type[MultiExitModel]", cls)
    registered = next((spec for spec in _REGISTRY.values() if spec.model_cls is cls), None)
    if registered is not None:  # a class decorated with register_model: its config and presets
        return ModelSpec(name, model_cls, registered.config_cls, registered.presets, registered.default_preset, source)
    config_cls = getattr(cls, "config_cls", None)
    if config_cls is not None and not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise ValueError(f"config_cls of model {name!r} must be a dataclass, got {config_cls!r}")
    presets = {str(k): dict(v) for k, v in dict(getattr(cls, "presets", None) or {}).items()}
    default = getattr(cls, "default_preset", None)
    if default is not None and default not in presets:
        raise ValueError(f"default preset {default!r} of model {name!r} is not one of {sorted(presets)}")
    return ModelSpec(name, model_cls, config_cls, presets, default, source)


def _spec(name: str) -> ModelSpec:
    _load_builtins()
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _USER_SPECS:
        return _USER_SPECS[name]
    if ":" in name:
        spec = _user_spec(name, _import_path(name), "import path")
    else:
        ep = _entry_points().get(name)
        if ep is None:
            raise ValueError(
                f"unknown model {name!r}; valid models: {', '.join(list_models())} "
                f"(or an import path 'package.module:ClassName', or an entry point in the group {ENTRY_POINT_GROUP!r})"
            )
        try:
            cls = ep.load()
        except Exception as err:  # noqa: BLE001
            raise ValueError(
                f"entry point {name!r} ({ENTRY_POINT_GROUP!r} group) = {ep.value!r} could not be loaded: {type(err).__name__}: {err}"
            ) from err
        spec = _user_spec(name, cls, "entry point")
    _USER_SPECS[name] = spec
    return spec


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a registry name (not an import path or an entry point)."""
    return _spec(name).source == "registry"


def list_models() -> list[str]:
    """Names of every registered model and every ``pcee.models`` entry point, sorted."""
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points()))


def list_presets(name: str) -> list[str]:
    """Preset (config) names of model ``name``, sorted."""
    return sorted(_spec(name).presets)


def default_preset(name: str) -> str | None:
    """The preset ``build_model(name)`` starts from."""
    return _spec(name).default_preset


def _init_signature(cls: type) -> inspect.Signature:
    """``cls.__init__``'s signature without ``self``."""
    return inspect.signature(cls)


def _accepts_any_keyword(cls: type) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _init_signature(cls).parameters.values())


def config_fields(name: str) -> list[str]:
    """The keyword overrides ``build_model(name, ...)`` accepts (a user class: its named ``__init__`` arguments)."""
    spec = _spec(name)
    if spec.config_cls is not None:
        return [f.name for f in dataclasses.fields(spec.config_cls)]
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in _init_signature(spec.model_cls).parameters.values() if p.kind in keyword]


def _json_config(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as they come back from model.json; ValueError naming a value JSON cannot hold."""
    for key, value in values.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(
                f"option {key!r} = {value!r} of model {name!r} is not JSON-serialisable: model.json must "
                "hold every option that rebuilds the model (use numbers, strings, bools, None, lists, dicts)"
            ) from None
    return json.loads(json.dumps(values))


def resolve_config(name: str, preset: str | None = None, **overrides: Any) -> Any:
    """The validated config for ``name``: preset values, then ``overrides``.

    The config dataclass for registered models and user classes with a ``config_cls``; for a user
    class built as ``cls(**config)``, the JSON-serialisable dict of keyword arguments, its
    ``__init__`` defaults included (those JSON can hold; tuples become lists).
    """
    spec = _spec(name)
    preset = spec.default_preset if preset is None else preset
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in spec.presets:
            valid_presets = ", ".join(sorted(spec.presets)) or "none (the model has no presets)"
            raise ValueError(f"unknown config {preset!r} for model {name!r}; valid configs: {valid_presets}")
        values.update(spec.presets[preset])
    valid = config_fields(name)
    if spec.config_cls is not None or not _accepts_any_keyword(spec.model_cls):
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for model {name!r}; valid options: {', '.join(valid)}")
    values.update(overrides)
    if spec.config_cls is not None:
        return spec.config_cls(**values)  # the dataclass's __post_init__ validates values
    values = _json_config(name, values)
    signature = _init_signature(spec.model_cls)
    try:
        signature.bind(**values)
    except TypeError as err:
        raise ValueError(f"model {name!r} cannot be built from {values}: {err}; options: {', '.join(valid)}") from None
    # record the defaults too (those JSON can hold), so model.json names the whole architecture
    defaults = {}
    for param in signature.parameters.values():
        if param.name in valid and param.name not in values and param.default is not inspect.Parameter.empty:
            try:
                defaults[param.name] = json.loads(json.dumps(param.default, allow_nan=False))
            except (TypeError, ValueError):
                pass  # not JSON: left to the class's default, on build and rebuild alike
    return {**defaults, **values}


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config (dataclass or dict) as a plain JSON-serialisable dict (tuples become lists)."""
    return json.loads(json.dumps(config if isinstance(config, dict) else dataclasses.asdict(config)))


def build_model(name: str, preset: str | None = None, **overrides: Any) -> MultiExitModel:
    """Build model ``name`` (registry name, import path or entry point) from ``preset`` (default preset
    if None) plus ``overrides``.

    Raises ``ValueError`` naming the valid models, configs or options when one is unknown, what could
    not be imported for an import path or entry point, and :class:`~pcee.models.contract.ContractError`
    (a ``ValueError``) when a user class breaks the multi-exit contract.
    """
    spec = _spec(name)
    config = resolve_config(name, preset, **overrides)
    model = spec.model_cls(config) if spec.config_cls is not None else spec.model_cls(**config)
    model.model_name = name
    model.config = config_to_dict(config)
    # the preset this exact architecture is (None when overrides changed it): for reference lookups
    base = spec.default_preset if preset is None else preset
    model.preset = base if base is not None and config_to_dict(resolve_config(name, base)) == model.config else None
    if spec.source != "registry":
        _check_user_model(model)
    return model


def _check_user_model(model: MultiExitModel) -> None:
    """A user class fails at build time, with the contract's message, rather than deep in training or serving."""

    cfg = model.config
    if isinstance(cfg.get("in_chans"), int) and isinstance(cfg.get("img_size"), int):
        check_model(model, (cfg["in_chans"], cfg["img_size"], cfg["img_size"]), batch=3)
    else:
        check_model_static(model)


def data_overrides(name: str, input_shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
    """Config overrides that fit model ``name`` to a dataset: its classes, channels and image size.

    Every registered config has ``num_classes``, ``in_chans`` and ``img_size``; this is the one
    place that maps a dataset's shape onto them. A user class gets the ones it accepts (its config
    fields, or its named ``__init__`` arguments).
    """
    channels, height, _ = input_shape
    wanted = {"num_classes": int(num_classes), "in_chans": int(channels), "img_size": int(height)}
    fields = set(config_fields(name))
    return {key: value for key, value in wanted.items() if key in fields}

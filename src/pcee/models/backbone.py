"""``attach-exits``: exit heads attached to an existing torchvision or timm backbone.

    build_model("attach-exits", backbone="timm:resnet18", exits=["layer2", "layer3"], num_classes=10)

The backbone is built by its library with random initialisation only (``weights=None`` /
``pretrained=False``): nothing is ever downloaded. Pretrained weights come from a local checkpoint
through :func:`load_backbone_weights`, which also marks the model ``backbone_pretrained`` so the
``disjoint`` regime trains only the new heads (:mod:`pcee.training.regimes`).

The backbone is cut into *stages* (``model.stage_names()``), by family:

=====================================  =============================  ==========================  ==============
family                                 run before the first stage     stages                      after the last
=====================================  =============================  ==========================  ==============
torchvision ResNet / ResNeXt           conv1, bn1, relu, maxpool      layer1 .. layer4            -
torchvision EfficientNet, MobileNet    features.0                     features.1 .. features.N    -
V2/V3, ConvNeXt
timm ResNet                            conv1, bn1, act1, maxpool      layer1 .. layer4            -
timm EfficientNet (MobileNetV2, ...)   conv_stem, bn1                 blocks.0 .. blocks.N        conv_head, bn2
timm ConvNeXt                          stem                           stages.0 .. stages.N        norm_pre
timm VisionTransformer                 patch_embed, _pos_embed,       blocks.0 .. blocks.N        norm
                                       patch_drop, norm_pre
=====================================  =============================  ==========================  ==============

An exit sits after each stage named in ``exits`` (names or 0-based indices; default: every stage);
the final exit always sits after the last stage. Segment k runs the stages between exit k-1 and
exit k (segment 0 also the stem, the last segment also the tail), so the early-exit runner skips
the rest of the backbone for samples that left. The backbone's own classifier (everything after
its features: pooling, ``fc`` / ``classifier`` / ``head``) is removed; every exit, the final one
included, is a new head in ``exit_heads``:

- ``head="linear"``: global average pool + linear (ViT: pooled token -> LayerNorm -> linear);
- ``head="conv"``: MSDNet-like, 3x3 conv (128 channels) -> BN -> ReLU, then pool + linear
  (convolutional backbones only).

The state between segments is the backbone's activation: a feature map (B, C, H, W), or the token
tensor (B, N, D) of a ViT.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from pcee.models.base import MultiExitModel, State
from pcee.models.registry import register_model

PREFIXES = ("torchvision:", "timm:")
HEADS = ("linear", "conv")
CONV_HEAD_CHANNELS = 128  # width of the conv head's 3x3 conv, as MSDNet's classifiers

# builder module -> family, per library (the module a builder is defined in names its architecture family)
_TORCHVISION_FAMILIES = {
    "torchvision.models.resnet": "tv-resnet",
    "torchvision.models.efficientnet": "tv-features",
    "torchvision.models.mobilenetv2": "tv-features",
    "torchvision.models.mobilenetv3": "tv-features",
    "torchvision.models.convnext": "tv-features",
}
_TIMM_FAMILIES = {
    "timm.models.resnet": "timm-resnet",
    "timm.models.efficientnet": "timm-efficientnet",
    "timm.models.convnext": "timm-convnext",
    "timm.models.vision_transformer": "timm-vit",
}
SUPPORTED_FAMILIES = (
    "torchvision: ResNet/ResNeXt/Wide-ResNet, EfficientNet (v1, v2), MobileNetV2, MobileNetV3, ConvNeXt; "
    "timm: ResNet family (resnet*, resnext*, ...), EfficientNet family (efficientnet*, mobilenetv2*, "
    "tinynet*, ...), ConvNeXt, VisionTransformer (vit_*)"
)
# hub-only spellings and constructor arguments that would fetch weights
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")
_WEIGHT_KWARGS = (
    "pretrained",
    "weights",
    "checkpoint_path",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "weights_backbone",
)
_NO_DOWNLOAD = (
    "pcee never downloads weights: the backbone is built with random initialisation; pass a local "
    "checkpoint instead (pcee train --backbone-weights PATH, or pcee.models.backbone.load_backbone_weights)"
)


def _split_backbone(backbone: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``, with clear errors for hub names and bad prefixes."""
    for hub in _HUB_PREFIXES:
        if backbone.startswith(hub) or any(backbone.startswith(p + hub) for p in PREFIXES):
            raise ValueError(f"backbone {backbone!r} names a model hub; {_NO_DOWNLOAD}")
    library, sep, arch = backbone.partition(":")
    if not sep or f"{library}:" not in PREFIXES or not arch:
        hint = ""
        if not sep:  # a bare name: suggest it under each library that has it
            hint = "; did you mean " + " or ".join(f"{p}{backbone}" for p in PREFIXES) + "?"
        raise ValueError(
            f"backbone {backbone!r} must start with one of {', '.join(PREFIXES)} (e.g. timm:resnet18){hint}"
        )
    return library, arch


def _library_models(library: str) -> list[str]:
    if library == "torchvision":
        import torchvision

        return sorted(torchvision.models.list_models())
    import timm

    return timm.list_models()


def _builder(library: str, arch: str):
    """The library's constructor for ``arch``; ValueError with close matches when it has none."""
    try:
        if library == "torchvision":
            import torchvision

            return torchvision.models.get_model_builder(arch)
        import timm
        from timm.models import model_entrypoint

        if timm.is_model(arch):
            return model_entrypoint(arch.split(".")[0])  # a pretrained tag ("resnet18.a1_in1k") names the same net
    except (ValueError, RuntimeError, KeyError):
        pass
    close = difflib.get_close_matches(arch, _library_models(library), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(f'{library}:{c}' for c in close)}" if close else ""
    raise ValueError(
        f"unknown backbone {library}:{arch!r}: {library} has no model {arch!r} "
        f"(valid prefixes: {', '.join(PREFIXES)}){hint}"
    )


def backbone_family(backbone: str) -> str:
    """The family (how it is cut into stages) of ``"library:arch"``; ValueError if unsupported."""
    library, arch = _split_backbone(backbone)
    module = _builder(library, arch).__module__
    families = _TORCHVISION_FAMILIES if library == "torchvision" else _TIMM_FAMILIES
    if module not in families:
        raise ValueError(
            f"backbone {backbone!r} ({module}) is not a supported architecture family; supported: {SUPPORTED_FAMILIES}"
        )
    return families[module]


@dataclass
class AttachExitsConfig:
    backbone: str = "torchvision:resnet18"  # "torchvision:<name>" or "timm:<name>"
    exits: list | None = None  # stage names or 0-based indices followed by an exit; None: every stage
    head: str = "linear"  # "linear" (pool + linear) or "conv" (conv-bn-relu, then pool + linear)
    num_classes: int = 10
    in_chans: int = 3
    img_size: int = 32
    backbone_kwargs: dict = field(default_factory=dict)  # passed to the backbone's constructor

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str):
            raise ValueError(f"backbone must be a string like 'timm:resnet18', got {self.backbone!r}")
        if not isinstance(self.backbone_kwargs, dict):
            raise ValueError(f"backbone_kwargs must be a dict, got {type(self.backbone_kwargs).__name__}")
        self.backbone_kwargs = dict(self.backbone_kwargs)
        asked = [k for k in _WEIGHT_KWARGS if self.backbone_kwargs.get(k) not in (None, False, "")]
        if asked:
            raise ValueError(f"backbone_kwargs {asked} would load pretrained weights; {_NO_DOWNLOAD}")
        clash = sorted({"num_classes", "in_chans", "img_size", "image_size"} & set(self.backbone_kwargs))
        if clash:
            raise ValueError(
                f"set {clash} as attach-exits options (num_classes, in_chans, img_size), not in backbone_kwargs"
            )
        backbone_family(self.backbone)  # unknown names and unsupported families fail here, before any build
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; valid: {', '.join(HEADS)}")
        if self.exits is not None:
            if isinstance(self.exits, (str, int)) or not isinstance(self.exits, (list, tuple)) or not self.exits:
                raise ValueError(
                    f"exits must be a non-empty list of stage names or indices (or None), got {self.exits!r}"
                )
            if any(isinstance(e, bool) or not isinstance(e, (str, int)) for e in self.exits):
                raise ValueError(f"exits must be stage names (str) or 0-based stage indices (int), got {self.exits!r}")
            self.exits = list(self.exits)
        if self.num_classes < 2 or self.in_chans < 1 or self.img_size < 1:
            raise ValueError("num_classes must be >= 2, in_chans >= 1 and img_size >= 1")


@dataclass(frozen=True)
class _Split:
    """Where a built backbone is cut: module names (inside the backbone) of each part."""

    stem: tuple[str, ...]  # run before the first stage (ViT: a method, see _stem)
    stages: tuple[str, ...]  # the stages, in order: the exit points
    tail: tuple[str, ...]  # run after the last stage (part of the final segment)
    classifier: tuple[str, ...]  # removed: the exit heads replace them; their checkpoint keys are ignored


def _split(family: str, net: nn.Module) -> _Split:
    if family == "tv-resnet":
        stages = ("layer1", "layer2", "layer3", "layer4")
        return _Split(("conv1", "bn1", "relu", "maxpool"), stages, (), ("avgpool", "fc"))
    # nn.Module types attribute access as Tensor | Module; these containers are nn.Sequential
    if family == "tv-features":
        stages = tuple(f"features.{i}" for i in range(1, len(cast(nn.Sequential, net.features))))
        return _Split(("features.0",), stages, (), ("avgpool", "classifier"))
    if family == "timm-resnet":
        stages = ("layer1", "layer2", "layer3", "layer4")
        return _Split(("conv1", "bn1", "act1", "maxpool"), stages, (), ("global_pool", "fc"))
    if family == "timm-efficientnet":
        stages = tuple(f"blocks.{i}" for i in range(len(cast(nn.Sequential, net.blocks))))
        return _Split(("conv_stem", "bn1"), stages, ("conv_head", "bn2"), ("global_pool", "classifier"))
    if family == "timm-convnext":
        stages = tuple(f"stages.{i}" for i in range(len(cast(nn.Sequential, net.stages))))
        return _Split(("stem",), stages, ("norm_pre",), ("head",))
    if family == "timm-vit":
        if getattr(net, "attn_pool", None) is not None or net.global_pool not in ("token", "avg"):
            raise ValueError(f"timm ViT with global_pool={net.global_pool!r} is not supported; valid: token, avg")
        stages = tuple(f"blocks.{i}" for i in range(len(cast(nn.Sequential, net.blocks))))
        stem = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre")
        return _Split(stem, stages, ("norm",), ("fc_norm", "head_drop", "head"))
    raise ValueError(f"unsupported family {family!r}; supported: {SUPPORTED_FAMILIES}")


def _build_backbone(config: AttachExitsConfig, family: str) -> nn.Module:
    """The library's network, randomly initialised, with ``in_chans`` input channels."""
    library, arch = _split_backbone(config.backbone)
    kwargs = dict(config.backbone_kwargs)
    if library == "timm":
        import timm

        if family == "timm-vit":
            kwargs["img_size"] = config.img_size
        return timm.create_model(arch, pretrained=False, num_classes=0, in_chans=config.in_chans, **kwargs)
    import torchvision

    net = torchvision.models.get_model(arch, weights=None, **kwargs)
    if config.in_chans != 3:  # torchvision's networks take RGB: replace the first convolution
        name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
        # torch types a Conv2d's kernel_size / stride / dilation (and non-string padding) as tuple[int, ...]
        kernel, stride, dilation = (cast(tuple[int, int], v) for v in (conv.kernel_size, conv.stride, conv.dilation))
        padding = cast("tuple[int, int] | str", conv.padding)
        new = nn.Conv2d(
            config.in_chans, conv.out_channels, kernel, stride, padding, dilation, conv.groups, conv.bias is not None
        )
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, new)
    return net


class PoolLinearHead(nn.Sequential):
    """(B, C, H, W) -> global average -> linear -> (B, K)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))


class ConvHead(nn.Sequential):
    """(B, C, H, W) -> 3x3 conv -> BN -> ReLU -> global average -> linear -> (B, K) (MSDNet-like)."""

    def __init__(self, channels: int, num_classes: int, hidden: int = CONV_HEAD_CHANNELS) -> None:
        super().__init__(
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(hidden, num_classes),
        )


class TokenHead(nn.Module):
    """(B, N, D) tokens -> class token (``pool="token"``) or mean of the patch tokens -> LayerNorm -> linear."""

    def __init__(self, dim: int, num_classes: int, pool: str, num_prefix_tokens: int) -> None:
        super().__init__()
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = tokens[:, 0] if self.pool == "token" else tokens[:, self.num_prefix_tokens :].mean(1)  # (B, D)
        return self.linear(self.norm(pooled))


@register_model(
    "attach-exits",
    config_cls=AttachExitsConfig,
    presets={
        "tv-resnet18": {},
        "timm-resnet18": {"backbone": "timm:resnet18"},
        "timm-vit-tiny": {
            "backbone": "timm:vit_tiny_patch16_224",
            "backbone_kwargs": {"patch_size": 4},
            "exits": [2, 5, 8, 11],
        },
        "digits": {
            "backbone": "timm:resnet18",
            "in_chans": 1,
            "img_size": 8,
            "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 64]},
        },
    },
    default_preset="tv-resnet18",
)
class AttachExits(MultiExitModel):
    def __init__(self, config: AttachExitsConfig) -> None:
        super().__init__()
        self.family = backbone_family(config.backbone)
        net = _build_backbone(config, self.family)
        self.split = _split(self.family, net)
        for name in self.split.classifier:  # the exits replace the backbone's classifier
            if hasattr(net, name):
                setattr(net, name, nn.Identity())
        self.backbone = net
        self.backbone_pretrained = False  # set by load_backbone_weights
        self.exit_stages = self._resolve_exits(config.exits)  # 0-based stage index of each exit, increasing
        shapes = self._exit_shapes(config)  # activation shape (without batch) at each exit
        heads = []
        for shape in shapes:
            if len(shape) == 2:  # (N, D) tokens
                if config.head == "conv":
                    raise ValueError(
                        f"head 'conv' needs a convolutional backbone; {config.backbone} is a transformer: use head 'linear'"
                    )
                # a timm ViT's pooling settings (nn.Module types attribute access as Tensor | Module)
                heads.append(
                    TokenHead(
                        shape[1], config.num_classes, cast(str, net.global_pool), cast(int, net.num_prefix_tokens)
                    )
                )
            elif config.head == "conv":
                heads.append(ConvHead(shape[0], config.num_classes))
            else:
                heads.append(PoolLinearHead(shape[0], config.num_classes))
        self.exit_heads = nn.ModuleList(heads)

    def stage_names(self) -> list[str]:
        """Names of the backbone's stages: the points an exit may follow."""
        return list(self.split.stages)

    @property
    def exit_names(self) -> list[str]:
        """The stage each exit follows."""
        return [self.split.stages[i] for i in self.exit_stages]

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    def _resolve_exits(self, exits: list | None) -> list[int]:
        names = self.stage_names()
        n = len(names)
        if exits is None:
            return list(range(n))
        indices = set()
        for e in exits:
            if isinstance(e, str) and e in names:
                indices.add(names.index(e))
            elif isinstance(e, int) and -n <= e < n:
                indices.add(e % n)
            else:
                raise ValueError(
                    f"exit point {e!r} is not a stage of {self.family} backbone; stages (name or 0-based index): "
                    + ", ".join(f"{i}={s}" for i, s in enumerate(names))
                )
        indices.add(n - 1)  # the final exit sits after the last stage
        return sorted(indices)

    @torch.no_grad()
    def _exit_shapes(self, config: AttachExitsConfig) -> list[tuple[int, ...]]:
        """Run one zero image through the backbone (eval mode) to read each exit's activation shape."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            state = torch.zeros(1, config.in_chans, config.img_size, config.img_size)
            shapes = []
            for k in range(self.num_exits):
                state = self._run_backbone(k, state)
                shapes.append(tuple(state.shape[1:]))
        except Exception as err:  # a too-small image for this backbone, a bad backbone_kwargs value, ...
            raise ValueError(
                f"backbone {config.backbone} with backbone_kwargs {config.backbone_kwargs} cannot run on "
                f"{config.in_chans}x{config.img_size}x{config.img_size} inputs: {err}"
            ) from err
        finally:
            self.backbone.train(was_training)
        return shapes

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "timm-vit":
            vit = cast(Any, self.backbone)  # a timm VisionTransformer (nn.Module types its attributes Tensor | Module)
            x = vit.patch_embed(x)  # (B, N, D)
            x = vit._pos_embed(x)  # (B, prefix + N, D): class token, position embedding
            x = vit.patch_drop(x)
            return vit.norm_pre(x)
        for name in self.split.stem:
            x = self.backbone.get_submodule(name)(x)
        return x  # (B, C, H, W)

    def _run_backbone(self, k: int, state: torch.Tensor) -> torch.Tensor:
        """Segment k's backbone part: the stages after exit k-1 up to exit k (stem first, tail last)."""
        h = self._stem(state) if k == 0 else state
        first = 0 if k == 0 else self.exit_stages[k - 1] + 1
        for name in self.split.stages[first : self.exit_stages[k] + 1]:
            h = self.backbone.get_submodule(name)(h)
        if k == self.num_exits - 1:
            for name in self.split.tail:
                h = self.backbone.get_submodule(name)(h)
        return h  # (B, C_k, H_k, W_k) or (B, N, D)

    def forward_segment(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"an attach-exits model's state is a tensor, got {type(state).__name__}")
        h = self._run_backbone(k, state)
        return h, self.exit_heads[k](h)  # (B, K)


def _strip_common_prefix(state: dict[str, Any], prefixes: tuple[str, ...] = ("module.", "backbone.")) -> dict[str, Any]:
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_backbone_weights(model: MultiExitModel, path: str | os.PathLike) -> AttachExits:
    """Load a local checkpoint into ``model``'s backbone only; mark it ``backbone_pretrained``.

    The file is read with ``torch.load(weights_only=True)``: a plain state_dict of the library's
    network (e.g. ``timm.create_model(...).state_dict()``), or a dict holding one under ``"state_dict"``
    or ``"model"``. Keys of the backbone's classifier (``fc``, ``classifier``, ``head``, ...) are
    ignored: the exit heads replace it. Missing, unexpected or wrongly shaped keys raise ValueError.
    """
    if not isinstance(model, AttachExits):
        raise ValueError(
            f"backbone weights load into an attach-exits model, not {getattr(model, 'model_name', '') or type(model).__name__}"
        )
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path} is not a state_dict (a dict of tensors, or one under 'state_dict' / 'model')")
    state = _strip_common_prefix(dict(ckpt))
    dropped = tuple(f"{name}." for name in model.split.classifier)
    state = {k: v for k, v in state.items() if not k.startswith(dropped)}
    expected = model.backbone.state_dict()
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit backbone {model.config.get('backbone')}: "
            f"missing keys: {_few(missing) or 'none'}; unexpected keys: {_few(unexpected) or 'none'}"
        )
    shapes = sorted(
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items() if v.shape != expected[k].shape
    )
    if shapes:
        raise ValueError(f"checkpoint {path} has wrongly shaped tensors (checkpoint vs model): {_few(shapes)}")
    model.backbone.load_state_dict(state, strict=False)
    model.backbone_pretrained = True
    return model

"""``msdnet``: Multi-Scale Dense Network (Huang et al., ICLR 2018), as in its public PyTorch port.

Written from the architecture of the port (github.com/kalviny/MSDNet-PyTorch, ``models/msdnet.py``):

- S = len(gr_factor) scales; scale s has ``c * gr_factor[s]`` channels at resolution / 2**s.
- First layer: a stem conv per scale (CIFAR: 3x3 conv at full resolution; ImageNet: 7x7/2 conv +
  3x3/2 max-pool), then a stride-2 3x3 conv for each coarser scale.
- Dense layer: at each kept scale s the output is ``cat[x_s, down(x_{s-1}), normal(x_s)]`` (the
  finest kept scale has only ``normal``), each conv a (1x1 bottleneck) + 3x3 conv with BN-ReLU, so
  channels grow by ``growth_rate * gr_factor[s]`` per layer.
- ``prune="max"``: the finest scales are dropped in S equal intervals of the total depth; where a
  layer drops a scale (in_scales > out_scales) a transition (1x1 conv-BN-ReLU per scale) multiplies
  the channels by ``reduction``. ``prune="min"`` keeps scales until the end and places transitions
  at 1/3 and 2/3 of the depth.
- Block k has ``steps[k]`` layers (``base``, then ``step`` each ("even") or ``step * k + 1``
  ("lin_grow")); classifier k reads the coarsest scale: two 3x3/2 conv-BN-ReLU (128 channels on
  CIFAR, as many as its input on ImageNet), average pool, linear.

Segment k = block k + classifier k; the state between segments is the list of multi-scale maps.
One documented difference: the classifier's final ``AvgPool2d(2)`` is an ``AdaptiveAvgPool2d(1)``,
identical (same output, same op count) on the 2x2 map it sees at 32x32 / 224x224 inputs, and
defined for other input sizes (e.g. 8x8 digits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pcee.models.base import MultiExitModel, State
from pcee.models.registry import register_model

STEP_MODES = ("even", "lin_grow")
PRUNE_MODES = ("max", "min")
STEMS = ("cifar", "imagenet")


@dataclass
class MSDNetConfig:
    num_classes: int = 100
    in_chans: int = 3
    img_size: int = 32
    n_blocks: int = 7
    step: int = 2
    base: int = 4
    step_mode: str = "even"
    n_channels: int = 16
    growth_rate: int = 6
    gr_factor: tuple[int, ...] = (1, 2, 4)
    bn_factor: tuple[int, ...] = (1, 2, 4)
    bottleneck: bool = True
    reduction: float = 0.5
    prune: str = "max"
    stem: str = "cifar"  # also selects the classifier head: 128-channel convs (cifar) or input-width convs (imagenet)

    def __post_init__(self) -> None:
        self.gr_factor = tuple(int(g) for g in self.gr_factor)
        self.bn_factor = tuple(int(b) for b in self.bn_factor)
        for name, value, choices in (
            ("step_mode", self.step_mode, STEP_MODES),
            ("prune", self.prune, PRUNE_MODES),
            ("stem", self.stem, STEMS),
        ):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")
        if len(self.bn_factor) != len(self.gr_factor) or not self.gr_factor:
            raise ValueError(
                f"gr_factor {list(self.gr_factor)} and bn_factor {list(self.bn_factor)} need one entry per scale"
            )
        if min(self.n_blocks, self.base, self.n_channels, self.growth_rate, self.num_classes - 1) < 1 or self.step < 0:
            raise ValueError("n_blocks, base, n_channels, growth_rate must be >= 1, num_classes >= 2, step >= 0")
        if not 0.0 <= self.reduction <= 1.0:
            raise ValueError(f"reduction must be in [0, 1], got {self.reduction}")

    @property
    def n_scales(self) -> int:
        return len(self.gr_factor)

    @property
    def steps(self) -> list[int]:
        """Number of dense layers in each block."""
        return [self.base] + [
            self.step if self.step_mode == "even" else self.step * k + 1 for k in range(1, self.n_blocks)
        ]


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class _BottleneckConv(nn.Sequential):
    """Optional 1x1 bottleneck (to at most ``bn_width * c_out`` channels), then a 3x3 conv (stride 1 or 2)."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: bool, bn_width: int) -> None:
        layers: list[nn.Module] = []
        c_inner = c_in
        if bottleneck:
            c_inner = min(c_in, bn_width * c_out)
            layers.append(ConvBNReLU(c_in, c_inner, kernel=1, stride=1, padding=0))
        layers.append(ConvBNReLU(c_inner, c_out, kernel=3, stride=stride, padding=1))
        super().__init__(*layers)


class _ScaleUnit(nn.Module):
    """New features at one scale: ``cat[x_s, down(x_{s-1}), normal(x_s)]`` or, with no finer input, ``cat[x_s, normal(x_s)]``."""

    def __init__(self, c_finer: int | None, c_same: int, c_new: int, bottleneck: bool, bn_finer: int, bn_same: int):
        super().__init__()
        if c_finer is None:
            self.down = None
            self.normal = _BottleneckConv(c_same, c_new, 1, bottleneck, bn_same)
        else:  # the new channels are split evenly between the two paths
            self.down = _BottleneckConv(c_finer, c_new // 2, 2, bottleneck, bn_finer)
            self.normal = _BottleneckConv(c_same, c_new // 2, 1, bottleneck, bn_same)

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None = None) -> torch.Tensor:
        if self.down is None:
            return torch.cat([same, self.normal(same)], dim=1)
        return torch.cat([same, self.down(finer), self.normal(same)], dim=1)


class _FirstLayer(nn.Module):
    """Input image -> list of S maps, scale s with ``c * gr_factor[s]`` channels."""

    def __init__(self, cfg: MSDNetConfig) -> None:
        super().__init__()
        c0 = cfg.n_channels * cfg.gr_factor[0]
        if cfg.stem == "cifar":
            stem: nn.Module = ConvBNReLU(cfg.in_chans, c0, kernel=3, stride=1, padding=1)
        else:  # the port's ImageNet stem: its 7x7 conv keeps its bias
            stem = nn.Sequential(
                nn.Conv2d(cfg.in_chans, c0, 7, stride=2, padding=3),
                nn.BatchNorm2d(c0),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        self.layers = nn.ModuleList([stem])
        for s in range(1, cfg.n_scales):
            self.layers.append(
                ConvBNReLU(cfg.n_channels * cfg.gr_factor[s - 1], cfg.n_channels * cfg.gr_factor[s], stride=2)
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for layer in self.layers:
            x = layer(x)
            maps.append(x)
        return maps


class _DenseLayer(nn.Module):
    """One MSDNet layer: ``in_scales`` coarsest maps in, ``out_scales`` coarsest maps out (drops at most one)."""

    def __init__(self, c_in: int, growth: int, cfg: MSDNetConfig, in_scales: int, out_scales: int) -> None:
        super().__init__()
        self.discard = in_scales - out_scales
        first = cfg.n_scales - out_scales  # absolute index of the finest output scale
        gr, bn = cfg.gr_factor, cfg.bn_factor
        self.units = nn.ModuleList()
        for s in range(first, cfg.n_scales):
            has_finer = s > first or self.discard > 0
            self.units.append(
                _ScaleUnit(
                    c_in * gr[s - 1] if has_finer else None,
                    c_in * gr[s],
                    growth * gr[s],
                    cfg.bottleneck,
                    bn[s - 1] if has_finer else bn[s],
                    bn[s],
                )
            )

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        # maps[j] is the (j + discard)-th input; unit j reads its own scale and, if any, the finer one
        out = []
        for j, unit in enumerate(self.units):
            i = j + self.discard
            out.append(unit(maps[i], maps[i - 1] if (self.discard > 0 or j > 0) else None))
        return out


class _Transition(nn.ModuleList):
    """1x1 conv-BN-ReLU per kept scale, compressing the channels."""

    def __init__(self, c_in: int, c_out: int, out_scales: int, cfg: MSDNetConfig) -> None:
        first = cfg.n_scales - out_scales
        super().__init__(
            ConvBNReLU(c_in * cfg.gr_factor[s], c_out * cfg.gr_factor[s], kernel=1, stride=1, padding=0)
            for s in range(first, cfg.n_scales)
        )

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(m) for conv, m in zip(self, maps, strict=True)]


class _MultiScaleSequential(nn.Sequential):
    """A block: layers mapping a list of maps to a list of maps (the first block starts from the image)."""


class MSDNetClassifier(nn.Module):
    """Exit head on the coarsest scale: two 3x3/2 conv-BN-ReLU, average pool, linear."""

    def __init__(self, c_in: int, c_mid: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNReLU(c_in, c_mid, kernel=3, stride=2, padding=1),
            ConvBNReLU(c_mid, c_mid, kernel=3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1),
        )
        self.linear = nn.Linear(c_mid, num_classes)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.linear(self.features(maps[-1]).flatten(1))  # (B, K)


def _layer_scales(cfg: MSDNetConfig, n_layer: int, n_layers_all: int) -> tuple[int, int]:
    """(in_scales, out_scales) of the ``n_layer``-th dense layer (1-based) of the whole network."""
    S = cfg.n_scales
    if cfg.prune == "min":
        return min(S, n_layers_all - n_layer + 2), min(S, n_layers_all - n_layer + 1)
    interval = math.ceil(n_layers_all / S)
    return S - (max(0, n_layer - 2) // interval), S - ((n_layer - 1) // interval)


@register_model(
    "msdnet",
    config_cls=MSDNetConfig,
    presets={
        # the port's CIFAR anytime-prediction network (README: nBlocks 7, step 2, base 4, even)
        "cifar100-anytime": {"num_classes": 100},
        "cifar10-anytime": {"num_classes": 10},
        # the port's CIFAR budgeted-batch network (README: nBlocks 5, lin_grow, step 1, base 1):
        # blocks of 1, 2, 3, 4, 5 layers
        "cifar-budgeted": {"num_classes": 100, "n_blocks": 5, "step_mode": "lin_grow", "step": 1, "base": 1},
        "imagenet": {
            "num_classes": 1000,
            "img_size": 224,
            "n_blocks": 5,
            "step": 4,
            "base": 4,
            "n_channels": 32,
            "growth_rate": 16,
            "gr_factor": (1, 2, 4, 4),
            "bn_factor": (1, 2, 4, 4),
            "stem": "imagenet",
        },
    },
    default_preset="cifar100-anytime",
)
class MSDNet(MultiExitModel):
    def __init__(self, config: MSDNetConfig) -> None:
        super().__init__()
        cfg = config
        steps = cfg.steps
        n_layers_all = sum(steps)
        self.blocks = nn.ModuleList()
        self.exit_heads = nn.ModuleList()
        c, n_layer = cfg.n_channels, 0
        for k, n_steps in enumerate(steps):
            layers: list[nn.Module] = [_FirstLayer(cfg)] if k == 0 else []
            for _ in range(n_steps):
                n_layer += 1
                in_scales, out_scales = _layer_scales(cfg, n_layer, n_layers_all)
                layers.append(_DenseLayer(c, cfg.growth_rate, cfg, in_scales, out_scales))
                c += cfg.growth_rate
                transition = cfg.reduction > 0 and (
                    (cfg.prune == "max" and in_scales > out_scales)
                    or (cfg.prune == "min" and n_layer in (n_layers_all // 3, (2 * n_layers_all) // 3))
                )
                if transition:
                    c_out = math.floor(cfg.reduction * c)
                    layers.append(_Transition(c, c_out, out_scales, cfg))
                    c = c_out
            self.blocks.append(_MultiScaleSequential(*layers))
            c_last = c * cfg.gr_factor[-1]
            c_mid = 128 if cfg.stem == "cifar" else c_last
            self.exit_heads.append(MSDNetClassifier(c_last, c_mid, cfg.num_classes))
        self.steps = steps
        self._init_weights()

    def _init_weights(self) -> None:
        # the port's initialisation: He-normal over fan-out for convs, BN (1, 0), zero linear bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def forward_segment(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        maps = self.blocks[k](state)  # list of (B, C_s, H/2^s, W/2^s), coarsest last
        return maps, self.exit_heads[k](maps)

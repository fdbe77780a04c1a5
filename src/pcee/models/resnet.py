"""``resnet18``: torchvision ResNet-18 with an exit head after each of its four stages.

Stem ``"cifar"``: 3x3/1 conv and no max-pool (the usual CIFAR variant); stem ``"imagenet"``:
torchvision's 7x7/2 conv + 3x3/2 max-pool. Exit k = global average pool + linear on stage k's
output (the last exit is torchvision's own avgpool + fc, moved into ``exit_heads``). Segment 0 is
stem + stage 1; the state is the feature map (B, C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from pcee.models.base import MultiExitModel, State
from pcee.models.registry import register_model

STEMS = ("cifar", "imagenet")
STAGE_CHANNELS = (64, 128, 256, 512)


@dataclass
class ResNetConfig:
    num_classes: int = 10
    in_chans: int = 3
    img_size: int = 32
    stem: str = "cifar"
    layers: tuple[int, ...] = (2, 2, 2, 2)  # BasicBlocks per stage: ResNet-18
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        self.layers = tuple(int(n) for n in self.layers)
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; valid: {', '.join(STEMS)}")
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {list(self.layers)}")
        if self.num_classes < 2 or self.in_chans < 1:
            raise ValueError("num_classes must be >= 2 and in_chans >= 1")


class _PoolLinearHead(nn.Sequential):
    """(B, C, H, W) -> global average -> linear -> (B, K)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))


@register_model(
    "resnet18",
    config_cls=ResNetConfig,
    presets={
        "cifar10": {},
        "cifar100": {"num_classes": 100},
        "imagenet": {"num_classes": 1000, "img_size": 224, "stem": "imagenet"},
    },
    default_preset="cifar10",
)
class MultiExitResNet(MultiExitModel):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        net = ResNet(
            BasicBlock,
            list(config.layers),
            num_classes=config.num_classes,
            zero_init_residual=config.zero_init_residual,
        )
        if config.stem == "cifar":
            net.conv1 = nn.Conv2d(config.in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()  # pyright: ignore[reportAttributeAccessIssue]  # torchvision infers maxpool as nn.MaxPool2d
        elif config.in_chans != 3:
            net.conv1 = nn.Conv2d(config.in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        heads = [_PoolLinearHead(c, config.num_classes) for c in STAGE_CHANNELS[:-1]]
        final = _PoolLinearHead(STAGE_CHANNELS[-1], config.num_classes)
        final[2] = net.fc  # torchvision's own classifier (same shape, its initialisation)
        self.exit_heads = nn.ModuleList([*heads, final])

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward_segment(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        h = self.stages[k](self.stem(state) if k == 0 else state)  # (B, C_k, H_k, W_k)
        return h, self.exit_heads[k](h)

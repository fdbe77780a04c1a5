"""``small-cnn``: a small multi-exit CNN for the embedded digits data (1x8x8) and CIFAR (3x32x32).

Block k = ``convs_per_block`` x (3x3 conv, BatchNorm, ReLU), then 2x2 max-pool where ``downsample[k]``.
Exit k = average pool to a ``head_pool`` x ``head_pool`` grid + linear on block k's output: the
early exits see few, shallow channels, so they are cheaper and weaker than the last one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pcee.models.base import MultiExitModel, State
from pcee.models.registry import register_model


@dataclass
class SmallCNNConfig:
    num_classes: int = 10
    in_chans: int = 1
    img_size: int = 8
    widths: tuple[int, ...] = (16, 32, 64, 64)  # output channels of each block (= number of exits)
    downsample: tuple[bool, ...] = (False, True, True, False)  # 2x2 max-pool at the end of block k
    convs_per_block: int = 1
    head_pool: int = 2  # exits average-pool to head_pool x head_pool cells, keeping a coarse layout
    dropout: float = 0.0  # before each exit's linear layer

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        self.downsample = tuple(bool(d) for d in self.downsample)
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be a non-empty list of positive ints, got {list(self.widths)}")
        if len(self.downsample) != len(self.widths):
            raise ValueError(
                f"downsample has {len(self.downsample)} entries but widths has {len(self.widths)}: one per block"
            )
        if self.img_size // 2 ** sum(self.downsample) < 1:
            raise ValueError(f"img_size {self.img_size} is too small for {sum(self.downsample)} 2x2 poolings")
        if self.num_classes < 2 or self.in_chans < 1 or self.convs_per_block < 1 or self.head_pool < 1:
            raise ValueError("num_classes must be >= 2; in_chans, convs_per_block and head_pool >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class _PoolLinearHead(nn.Sequential):
    """(B, C, H, W) -> average to (B, C, P, P) -> flatten -> linear -> (B, K)."""

    def __init__(self, channels: int, num_classes: int, pool: int = 1, dropout: float = 0.0) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(1),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(channels * pool * pool, num_classes),
        )


@register_model(
    "small-cnn",
    config_cls=SmallCNNConfig,
    presets={
        "digits": {},
        "cifar": {
            "in_chans": 3,
            "img_size": 32,
            "widths": (32, 64, 128, 256),
            "downsample": (True, True, True, False),
            "convs_per_block": 2,
        },
    },
    default_preset="digits",
)
class SmallCNN(MultiExitModel):
    def __init__(self, config: SmallCNNConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        c_in = config.in_chans
        for width, down in zip(config.widths, config.downsample, strict=True):
            layers: list[nn.Module] = []
            for i in range(config.convs_per_block):
                layers += _conv_bn_relu(c_in if i == 0 else width, width)
            if down:
                layers.append(nn.MaxPool2d(2))
            self.blocks.append(nn.Sequential(*layers))
            c_in = width
        self.exit_heads = nn.ModuleList(
            _PoolLinearHead(w, config.num_classes, config.head_pool, config.dropout) for w in config.widths
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def forward_segment(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        h = self.blocks[k](state)  # (B, C_k, H_k, W_k)
        return h, self.exit_heads[k](h)  # logits (B, K)

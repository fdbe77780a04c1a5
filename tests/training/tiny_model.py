"""A private three-exit CNN for regime tests that must not depend on the model registry's choices."""

from __future__ import annotations

import torch
from torch import nn

from pcee.models.base import MultiExitModel


class TinyMultiExit(MultiExitModel):
    model_name = "tiny-test"

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width}
        chans = [in_channels, width, width, width]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]), nn.ReLU())
            for i in range(3)
        )
        self.exit_heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 16, num_classes)) for _ in range(3)
        )

    @property
    def num_exits(self) -> int:
        return 3

    def forward_segment(self, k: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks[k](state)  # (B, width, H, W)
        return h, self.exit_heads[k](h)  # (B, K)

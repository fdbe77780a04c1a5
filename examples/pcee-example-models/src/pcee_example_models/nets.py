"""Two small multi-exit networks for 1x8x8 digits and 3x32x32 images, written against pcee's
multi-exit contract (pcee docs/models.md) without editing pcee.

- :class:`TinyMLPExits` is built as ``TinyMLPExits(**config)``: plain JSON-serialisable keyword
  arguments, the simplest convention.
- :class:`TinyConvExits` declares ``config_cls`` (a dataclass) and presets, like pcee's built-in
  models, and is built as ``TinyConvExits(TinyConvConfig(**config))``.

Both name their size arguments ``num_classes``, ``in_chans`` and ``img_size``, so ``pcee train``
fits them to the dataset and pcee checks the whole contract when it builds them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from pcee.models.base import MultiExitModel


class TinyMLPExits(MultiExitModel):
    """Flatten, then one ``Linear + ReLU`` block per exit; exit k is a linear layer on block k's output.

    State: the (B, hidden[k]) activation; the batch is on dim 0, as the contract asks.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 8,
        hidden: list[int] | tuple[int, ...] = (64, 64, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be a non-empty list of positive ints, got {hidden}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        widths = [in_chans * img_size * img_size, *hidden]
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in itertools.pairwise(widths))
        # one head per exit, no parameter shared: what pcee's training regimes freeze and train
        self.exit_heads = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout) if dropout > 0 else nn.Identity(), nn.Linear(h, num_classes))
            for h in hidden
        )

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def initial_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (B, C*H*W)

    def forward_segment(self, k: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks[k](state)  # (B, hidden[k])
        return h, self.exit_heads[k](h)  # logits (B, K)


@dataclass
class TinyConvConfig:
    num_classes: int = 10
    in_chans: int = 1
    img_size: int = 8
    widths: tuple[int, ...] = (8, 16, 32)  # channels of each block (= number of exits)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be a non-empty list of positive ints, got {list(self.widths)}")
        if self.num_classes < 2 or self.in_chans < 1 or self.img_size < 1:
            raise ValueError("num_classes must be >= 2; in_chans and img_size >= 1")


class TinyConvExits(MultiExitModel):
    """3x3 conv + BatchNorm + ReLU per block (2x2 max-pool after the first while the image is >= 16
    pixels); exit k = global average pool + linear. The state is (feature map, running sum of the
    pooled features): a tuple of tensors, each with the batch on dim 0."""

    config_cls = TinyConvConfig
    presets = {"digits": {}, "cifar": {"in_chans": 3, "img_size": 32, "widths": (16, 32, 64)}}
    default_preset = "digits"

    def __init__(self, config: TinyConvConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        c_in, size = config.in_chans, config.img_size
        for width in config.widths:
            layers: list[nn.Module] = [
                nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            if size >= 16:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            self.blocks.append(nn.Sequential(*layers))
            c_in = width
        self.pools = nn.ModuleList(nn.Linear(w, config.widths[-1], bias=False) for w in config.widths)
        self.exit_heads = nn.ModuleList(nn.Linear(config.widths[-1], config.num_classes) for _ in config.widths)

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x.new_zeros((x.shape[0], self.pools[0].out_features))

    def forward_segment(
        self, k: int, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        h, pooled_sum = state
        h = self.blocks[k](h)  # (B, C_k, H_k, W_k)
        pooled_sum = pooled_sum + self.pools[k](h.mean(dim=(2, 3)))  # (B, widths[-1])
        return (h, pooled_sum), self.exit_heads[k](pooled_sum)  # logits (B, K)

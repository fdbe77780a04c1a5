"""``vit``: torchvision ``VisionTransformer`` backbone with exits after chosen encoder blocks.

Exit k = LayerNorm + Linear on the class token after encoder block ``exit_blocks[k]`` (1-based;
the last entry must be the last block). torchvision's final LayerNorm and head are replaced by
the last exit's own, so every head lives in ``exit_heads``. Segment k runs the encoder blocks
between the previous exit and this one (segment 0 also embeds the patches); the state is the
token tensor (B, 1 + N_patches, D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from pcee.models.base import MultiExitModel, State
from pcee.models.registry import register_model


@dataclass
class ViTConfig:
    num_classes: int = 10
    in_chans: int = 3
    img_size: int = 32
    patch_size: int = 4
    num_layers: int = 6
    num_heads: int = 3
    hidden_dim: int = 192
    mlp_dim: int = 384
    dropout: float = 0.0
    attention_dropout: float = 0.0
    exit_blocks: tuple[int, ...] = (2, 4, 6)  # 1-based encoder blocks followed by an exit

    def __post_init__(self) -> None:
        self.exit_blocks = tuple(int(b) for b in self.exit_blocks)
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        blocks = list(self.exit_blocks)
        if not blocks or blocks != sorted(set(blocks)) or blocks[0] < 1 or blocks[-1] != self.num_layers:
            raise ValueError(
                f"exit_blocks {blocks} must be strictly increasing block numbers in 1..{self.num_layers} "
                f"ending with the last block {self.num_layers}"
            )
        if self.num_classes < 2 or self.in_chans < 1:
            raise ValueError("num_classes must be >= 2 and in_chans >= 1")


class ViTExitHead(nn.Module):
    """(B, N, D) tokens -> LayerNorm of the class token -> linear -> (B, K)."""

    def __init__(self, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.linear = nn.Linear(hidden_dim, num_classes)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(tokens[:, 0]))


@register_model(
    "vit",
    config_cls=ViTConfig,
    presets={
        "cifar-tiny": {},
        "cifar-small": {
            "num_layers": 8,
            "num_heads": 6,
            "hidden_dim": 384,
            "mlp_dim": 768,
            "exit_blocks": (2, 4, 6, 8),
        },
        "digits": {
            "in_chans": 1,
            "img_size": 8,
            "patch_size": 2,
            "num_layers": 4,
            "num_heads": 4,
            "hidden_dim": 64,
            "mlp_dim": 128,
            "exit_blocks": (1, 2, 3, 4),
        },
    },
    default_preset="cifar-tiny",
)
class MultiExitViT(MultiExitModel):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        vit = VisionTransformer(
            image_size=config.img_size,
            patch_size=config.patch_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            hidden_dim=config.hidden_dim,
            mlp_dim=config.mlp_dim,
            dropout=config.dropout,
            attention_dropout=config.attention_dropout,
            num_classes=config.num_classes,
        )
        if config.in_chans != 3:  # torchvision's patchify conv assumes RGB
            vit.conv_proj = nn.Conv2d(config.in_chans, config.hidden_dim, config.patch_size, stride=config.patch_size)
            fan_in = config.in_chans * config.patch_size**2
            nn.init.trunc_normal_(vit.conv_proj.weight, std=math.sqrt(1 / fan_in))
            if vit.conv_proj.bias is not None:
                nn.init.zeros_(vit.conv_proj.bias)
        # the exits carry their own norms and heads: drop torchvision's so they are not dead weights
        vit.encoder.ln = nn.Identity()
        vit.heads = nn.Identity()  # pyright: ignore[reportAttributeAccessIssue]  # torchvision infers heads as nn.Sequential
        self.vit = vit
        self.exit_blocks = config.exit_blocks
        self.exit_heads = nn.ModuleList(ViTExitHead(config.hidden_dim, config.num_classes) for _ in config.exit_blocks)

    @property
    def num_exits(self) -> int:
        return len(self.exit_blocks)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, 1 + N, D) tokens with class token and position embedding."""
        tokens = self.vit._process_input(x)  # (B, N, D)
        cls = self.vit.class_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.vit.encoder.pos_embedding
        return self.vit.encoder.dropout(tokens)

    def forward_segment(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"the ViT's state is a tensor, got {type(state).__name__}")
        tokens = self.embed(state) if k == 0 else state  # (B, 1 + N, D)
        start = 0 if k == 0 else self.exit_blocks[k - 1]
        # torch types any Sequential index as Sequential | Module; a slice is a Sequential
        for block in cast(nn.Sequential, self.vit.encoder.layers[start : self.exit_blocks[k]]):
            tokens = block(tokens)
        return tokens, self.exit_heads[k](tokens)

"""Training-time augmentation on whole batches (tensors, no per-sample Python loop).

CIFAR-style: random crop with zero padding + random horizontal flip. 8x8 digits get none: a flip
changes a digit's meaning and a 4-pixel shift half its content.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pcee.training.config import AUGMENTATIONS


def resolve_augment(name: str, input_shape: tuple[int, ...]) -> str:
    """``auto`` -> ``crop-flip`` for RGB inputs of at least 32x32, else ``none``."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; valid augmentations: {', '.join(AUGMENTATIONS)}")
    if name != "auto":
        return name
    c, h, w = input_shape[-3:]
    return "crop-flip" if c == 3 and min(h, w) >= 32 else "none"


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random ``padding``-pixel shifted crop (zero fill) and horizontal flip of each sample (B, C, H, W)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (oy[:, None] + torch.arange(h)).to(x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def apply_augment(name: str, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if name == "none":
        return x
    if name == "crop-flip":
        return crop_flip(x, generator)
    raise ValueError(f"unknown augmentation {name!r}; valid augmentations: none, crop-flip")

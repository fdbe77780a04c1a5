"""Training-time augmentation on whole batches (tensors, no per-sample Python loop).

CIFAR-style: random crop with zero padding + random horizontal flip. 8x8 digits get none: a flip
changes a digit's meaning and a 4-pixel shift half its content.

The random draws come from a generator on the CPU, whatever the device (the same numbers on CPU and GPU),
and the trainer draws a whole epoch's at once (:func:`draw_epoch`, batch after batch, the same sequence as
drawing per batch) and moves them to the device in one copy: no step waits for the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pcee.training.config import AUGMENTATIONS

PADDING = 4


def resolve_augment(name: str, input_shape: tuple[int, ...]) -> str:
    """``auto`` -> ``crop-flip`` for RGB inputs of at least 32x32, else ``none``."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; valid augmentations: {', '.join(AUGMENTATIONS)}")
    if name != "auto":
        return name
    c, h, w = input_shape[-3:]
    return "crop-flip" if c == 3 and min(h, w) >= 32 else "none"


def crop_flip_draw(b: int, generator: torch.Generator, padding: int = PADDING) -> torch.Tensor:
    """(b, 3) int64 on the CPU: each sample's row offset, column offset and flip (0/1)."""
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.stack([oy, ox, flip.long()], dim=1)


def crop_flip_apply(x: torch.Tensor, draws: torch.Tensor, padding: int = PADDING) -> torch.Tensor:
    """Shift each sample of ``x`` (B, C, H, W) by its drawn offsets (zero fill) and flip it where drawn;
    ``draws`` (B, 3) from :func:`crop_flip_draw`, on ``x``'s device."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    oy, ox, flip = draws[:, 0], draws[:, 1], draws[:, 2].bool()
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = PADDING) -> torch.Tensor:
    """Random ``padding``-pixel shifted crop (zero fill) and horizontal flip of each sample (B, C, H, W)."""
    return crop_flip_apply(x, crop_flip_draw(len(x), generator, padding).to(x.device), padding)


def draw_epoch(name: str, batch_sizes: list[int], generator: torch.Generator) -> torch.Tensor | None:
    """One epoch's draws for batches of ``batch_sizes``, in order, stacked (sum(batch_sizes), 3); None for ``none``."""
    if name == "none":
        return None
    if name == "crop-flip":
        return torch.cat([crop_flip_draw(b, generator) for b in batch_sizes]) if batch_sizes else None
    raise ValueError(f"unknown augmentation {name!r}; valid augmentations: none, crop-flip")


def apply_augment(name: str, x: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
    """Augment batch ``x`` with its slice of :func:`draw_epoch`'s draws."""
    if name == "none":
        return x
    if name == "crop-flip" and draws is not None:
        return crop_flip_apply(x, draws)
    raise ValueError(f"unknown augmentation {name!r} (or no draws); valid augmentations: none, crop-flip")

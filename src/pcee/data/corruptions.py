"""Image corruptions for distribution-shift tests, CIFAR-10-C style, severities 1-5.

Severity constants are those of Hendrycks & Dietterich, "Benchmarking Neural Network Robustness
to Common Corruptions and Perturbations" (ICLR 2019), from their CIFAR-10-C generator
(``make_cifar_c.py`` in github.com/hendrycks/robustness), all on images in [0, 1]:

    gaussian_noise  sigma   = [0.04, 0.06, 0.08, 0.09, 0.10]
    gaussian_blur   sigma   = [0.4, 0.6, 0.7, 0.8, 1.0]            (pixels)
    contrast        factor  = [0.75, 0.5, 0.4, 0.3, 0.15]
    brightness      +V(HSV) = [0.05, 0.1, 0.15, 0.2, 0.3]
    pixelate        scale   = [0.95, 0.9, 0.85, 0.75, 0.65]

The ops are torchvision.transforms.v2.functional's where one exists, which differ from the
original numpy/skimage/PIL code in small, documented ways:

- gaussian_blur: ``F.gaussian_blur`` with reflect padding (skimage used 'nearest') and a kernel
  of radius ceil(3 sigma), capped so it fits tiny images (8x8 digits).
- contrast: ``F.adjust_contrast`` blends with the mean of the greyscale image; the original
  blends with each channel's own mean. Identical for one-channel images.
- brightness: the original adds c to V in HSV and clips. Keeping hue and saturation fixed, that
  scales each pixel's RGB by V'/V, a per-pixel factor; ``F.adjust_brightness`` only takes one
  global factor, so we compute the exact per-pixel form (two tensor ops, no HSV round trip).
- pixelate: PIL's BOX resampling down and back up, as the original, computed as two small
  weight matrices in torch (torchvision's tensor ``resize`` has no BOX mode; its bilinear/nearest
  modes do not pixelate at ratios like 32 -> 30). Images under 32 px use our own wider scales
  (see ``_PIXELATE_SMALL``) so each severity is strictly coarser (8x8: 7, 5, 4, 3, 2 px).

Noise is drawn from a ``torch.Generator`` seeded by ``seed``, so numpy and torch inputs give the
same result. Output is clipped to [0, 1] and has the input's type, dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "brightness", "pixelate")
SEVERITIES = (1, 2, 3, 4, 5)

_NOISE_SIGMA = (0.04, 0.06, 0.08, 0.09, 0.10)
_BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
# Ours, for images under 32 px: at 8 px the scales above give 7, 7, 6, 6, 5 px, barely distinct,
# and 8 -> 6 -> 8 changes digits more than 8 -> 5 -> 8 (mean |diff| 0.120 vs 0.114), so tiny
# images use a wider, strictly coarsening range (8x8: 7, 5, 4, 3, 2 px).
_PIXELATE_SMALL = (0.875, 0.625, 0.5, 0.375, 0.25)


def _gaussian_noise(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    return x + noise * _NOISE_SIGMA[severity - 1]


def _gaussian_blur(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    sigma = _BLUR_SIGMA[severity - 1]
    size = 2 * math.ceil(3 * sigma) + 1
    # Reflect padding needs radius < side; keep the kernel odd and within 2*side - 1.
    max_size = 2 * min(x.shape[-2:]) - 1
    size = min(size, max_size if max_size % 2 == 1 else max_size - 1)
    return F.gaussian_blur(x, kernel_size=[size, size], sigma=[sigma, sigma])


def _contrast(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    return F.adjust_contrast(x, _CONTRAST[severity - 1])


def _brightness(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    value = x.amax(dim=-3, keepdim=True)  # V of HSV, (N, 1, H, W)
    new_value = (value + _BRIGHTNESS[severity - 1]).clamp(max=1.0)
    # Hue and saturation fixed -> RGB scales by V'/V; a black pixel (V=0) becomes grey V'.
    scale = torch.where(value > 0, new_value / value.clamp(min=1e-12), torch.zeros_like(value))
    return torch.where(value > 0, x * scale, new_value.expand_as(x))


def _box_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in) weights of PIL's BOX resampling filter (ImagingResample's precompute_coeffs).

    Torchvision's tensor ``resize`` has no BOX mode, and its bilinear-down/nearest-up pair makes
    non-integer ratios (32 -> 30 -> 32) shift pixels rather than pixelate, so the corruption did
    not grow with severity; this reproduces the original's box filter exactly (without the uint8
    rounding of PIL images).
    """
    scale = in_size / out_size
    support = 0.5 * max(scale, 1.0)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        for j in range(lo, hi):
            offset = (j - center + 0.5) / max(scale, 1.0)
            weights[i, j] = 1.0 if -0.5 <= offset < 0.5 else 0.0
        weights[i] /= weights[i].sum()
    return weights.to(torch.float32)


def _box_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    rows = _box_matrix(x.shape[-2], size[0]).to(x.device)
    cols = _box_matrix(x.shape[-1], size[1]).to(x.device)
    return torch.einsum("ih,nchw,jw->ncij", rows, x, cols)


def _pixelate(x: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    c = _PIXELATE[severity - 1]
    if min(h, w) < 32:
        c = _PIXELATE_SMALL[severity - 1]
        small = (max(1, round(h * c)), max(1, round(w * c)))
    else:
        small = (max(1, int(h * c)), max(1, int(w * c)))
    return _box_resize(_box_resize(x, small), (h, w))


_OPS: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
}


def corrupt(x: np.ndarray | torch.Tensor, name: str, severity: int, seed: int = 0) -> np.ndarray | torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to images in [0, 1].

    ``x`` is (N, C, H, W) or one (C, H, W) image, numpy or torch, with C = 1 or 3; the result has
    the same shape, type and dtype, clipped to [0, 1]. Raises ValueError for an unknown name or
    severity, listing the valid ones.
    """
    if name not in _OPS:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(map(str, SEVERITIES))}, got {severity!r}")
    is_numpy = isinstance(x, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(x)) if is_numpy else x
    if t.ndim not in (3, 4) or t.shape[-3] not in (1, 3):
        raise ValueError(f"expected (N, C, H, W) or (C, H, W) images with C in (1, 3), got shape {tuple(t.shape)}")
    dtype = t.dtype
    single = t.ndim == 3
    work = (t[None] if single else t).to(torch.float32)
    out = _OPS[name](work, int(severity), seed).clamp_(0.0, 1.0).to(dtype)
    out = out[0] if single else out
    return out.numpy() if is_numpy else out


#: JPEG qualities of the shift benchmarks' harshest compression conditions (CIFAR-10-C's own
#: jpeg_compression severities are qualities 80, 65, 58, 50, 40; 10 and 5 go well beyond them)
JPEG_QUALITIES = (40, 20, 10, 5)


def jpeg_compress(x: np.ndarray | torch.Tensor, quality: int) -> np.ndarray | torch.Tensor:
    """JPEG round trip at ``quality`` (1-100) of images in [0, 1] (torchvision's ``F.jpeg`` on the
    8-bit image); same shapes and types as :func:`corrupt`."""
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
    is_numpy = isinstance(x, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(x)) if is_numpy else x
    if t.ndim not in (3, 4) or t.shape[-3] not in (1, 3):
        raise ValueError(f"expected (N, C, H, W) or (C, H, W) images with C in (1, 3), got shape {tuple(t.shape)}")
    dtype, device, single = t.dtype, t.device, t.ndim == 3
    work = (t[None] if single else t).to(device="cpu", dtype=torch.float32)
    as_bytes = (work.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    out = (F.jpeg(as_bytes, int(quality)).to(torch.float32) / 255.0).to(device=device, dtype=dtype)
    out = out[0] if single else out
    return out.numpy() if is_numpy else out

"""ImageFolder trees (``<root>/<class>/<image>``) read into uint8 arrays with PIL.

The tree is scanned with torchvision's own ``find_classes``/``make_dataset`` (same class order
and file filter as ``ImageFolder``); images are decoded only for the indices a caller asks for,
in a thread pool (PIL releases the GIL while decoding).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

LAYOUT = (
    "<path>/train/<class>/<image> and <path>/test/<class>/<image> "
    "(or a single <path>/<class>/<image> tree, from which test is carved)"
)


@dataclass(frozen=True)
class ImageTree:
    """A scanned ImageFolder tree: file paths, integer labels and class names (sorted)."""

    root: Path
    paths: list[str]
    labels: np.ndarray  # (N,) int64
    classes: list[str]


def scan_tree(root: str | os.PathLike) -> ImageTree:
    """List an ImageFolder tree; fails naming the path and the layout when it is not one."""
    root = Path(root)
    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{root} is not an ImageFolder tree ({err}); expected {LAYOUT}") from None
    return ImageTree(
        root=root,
        paths=[path for path, _ in samples],
        labels=np.asarray([label for _, label in samples], dtype=np.int64),
        classes=list(classes),
    )


def _decode(path: str, mode: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert(mode), dtype=np.uint8)


def image_mode(path: str) -> str:
    """'L' for greyscale trees (one channel), 'RGB' for everything else."""
    with Image.open(path) as img:
        return "L" if img.mode in ("L", "1", "I;16", "I") else "RGB"


def read_images(paths: list[str], mode: str, workers: int = 8) -> np.ndarray:
    """Decode ``paths`` into one uint8 array (N, H, W, C); every image must have the same size."""
    if not paths:
        raise ValueError("no images to read")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = list(pool.map(lambda p: _decode(p, mode), paths, chunksize=64))
    shape = images[0].shape
    for path, img in zip(paths, images, strict=True):
        if img.shape != shape:
            raise ValueError(
                f"images differ in size: {paths[0]} is {shape[:2]} but {path} is {img.shape[:2]}; "
                "resize the tree to one size first"
            )
    out = np.stack(images)
    return out[..., None] if out.ndim == 3 else out  # greyscale -> (N, H, W, 1)

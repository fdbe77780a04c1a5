"""CIFAR-10/100 from a local root through torchvision's own dataset classes (never downloaded).

torchvision verifies every batch file against the md5 of the official release before it reads
anything, so a truncated or foreign file is refused. We keep that check and turn its bare
"Dataset not found or corrupted" into a message naming the root, the expected layout, and which
files are missing or fail their checksum.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity

CIFAR_CLASSES: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def expected_layout(cls: type[CIFAR10]) -> str:
    files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return f"<root>/{cls.base_folder}/{{{', '.join(files)}}} (the extracted official python archive)"


def _integrity_problems(root: Path, cls: type[CIFAR10]) -> list[str]:
    problems = []
    for name, md5 in cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]:
        path = root / cls.base_folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif not check_integrity(str(path), md5):
            problems.append(f"{name}: md5 differs from the official release ({md5})")
    return problems


def load_cifar_arrays(
    name: str, root: str | os.PathLike | None, cls: type[CIFAR10] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Read a CIFAR root with torchvision's class: (train_x, train_y, test_x, test_y, class_names).

    ``x`` arrays are uint8 (N, 32, 32, 3) as torchvision holds them; ``y`` int64. ``cls`` defaults
    to torchvision's CIFAR10/CIFAR100; tests pass a subclass whose checksums match their files.
    """
    cls = cls or CIFAR_CLASSES[name]
    if root is None:
        raise FileNotFoundError(f"{name} needs a local root (--root DIR) laid out as {expected_layout(cls)}")
    root_path = Path(root).expanduser()
    if not (root_path / cls.base_folder).is_dir():
        raise FileNotFoundError(
            f"{name}: no {cls.base_folder}/ under {root_path}; expected {expected_layout(cls)}. "
            "Nothing is downloaded: extract the official archive there first."
        )
    problems = _integrity_problems(root_path, cls)
    if problems:
        raise FileNotFoundError(
            f"{name}: {root_path / cls.base_folder} is incomplete or corrupted ({'; '.join(problems)}); "
            f"expected {expected_layout(cls)}"
        )
    train = cls(str(root_path), train=True, download=False)
    test = cls(str(root_path), train=False, download=False)
    return (
        np.ascontiguousarray(train.data),
        np.asarray(train.targets, dtype=np.int64),
        np.ascontiguousarray(test.data),
        np.asarray(test.targets, dtype=np.int64),
        list(train.classes),
    )

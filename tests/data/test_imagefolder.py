"""ImageFolder trees written here with PIL (lossless PNG so pixels can be checked exactly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pcee.data import load_dataset

CLASSES = ["cat", "dog", "frog"]


def write_tree(root: Path, per_class: int, offset: int, size=(6, 5), mode="RGB") -> dict[str, np.ndarray]:
    """One image per (class, i) whose pixels encode class and index; returns path -> HWC uint8."""
    written = {}
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng(1000 * label + i + offset)
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            path = root / name / f"{i:03d}.png"
            Image.fromarray(pixels, mode=mode).save(path)
            written[str(path)] = pixels
    return written


def _lookup(x_chw: np.ndarray, written: dict[str, np.ndarray]) -> bool:
    target = np.round(x_chw.transpose(1, 2, 0) * 255).astype(np.uint8)
    return any(np.array_equal(target, px if px.ndim == 3 else px[..., None]) for px in written.values())


def test_train_and_test_trees(tmp_path):
    train = write_tree(tmp_path / "train", per_class=10, offset=0)
    test = write_tree(tmp_path / "test", per_class=4, offset=500)
    splits = load_dataset(f"imagefolder:{tmp_path}", seed=0, val_size=6)
    assert splits.class_names == CLASSES and splits.num_classes == 3
    assert splits.input_shape == (3, 5, 6)  # (C, H, W) of 6x5 (W x H) images
    assert splits.sizes() == {"train": 24, "val": 6, "test": 12}
    assert np.bincount(splits.val.y).tolist() == [2, 2, 2]
    for split in (splits.train, splits.val, splits.test):
        assert split.x.dtype == np.float32 and 0.0 <= split.x.min() and split.x.max() <= 1.0
    # every image is the file it came from, exactly (scaled by 1/255), from the right tree
    assert all(_lookup(img, train) for img in splits.train.x)
    assert all(_lookup(img, train) for img in splits.val.x)
    assert all(_lookup(img, test) for img in splits.test.x)
    # val never overlaps train
    as_bytes = lambda s: {img.tobytes() for img in s.x}  # noqa: E731
    assert not as_bytes(splits.train) & as_bytes(splits.val)


def test_caps_and_determinism(tmp_path):
    write_tree(tmp_path / "train", per_class=10, offset=0)
    write_tree(tmp_path / "test", per_class=4, offset=500)
    a = load_dataset(f"imagefolder:{tmp_path}", seed=1, val_size=0.2, train_size=9, test_size=6)
    b = load_dataset("imagefolder", root=tmp_path, seed=1, val_size=0.2, train_size=9, test_size=6)
    assert a.sizes() == {"train": 9, "val": 6, "test": 6}
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, part).x, getattr(b, part).x)


def test_single_tree_carves_test(tmp_path):
    written = write_tree(tmp_path, per_class=10, offset=0)
    splits = load_dataset(f"imagefolder:{tmp_path}", val_size=6, test_size=6)
    assert splits.sizes() == {"train": 18, "val": 6, "test": 6}
    all_x = np.concatenate([splits.train.x, splits.val.x, splits.test.x])
    assert len({img.tobytes() for img in all_x}) == 30
    assert all(_lookup(img, written) for img in all_x)


def test_greyscale_tree_has_one_channel(tmp_path):
    write_tree(tmp_path / "train", per_class=5, offset=0, mode="L")
    write_tree(tmp_path / "test", per_class=2, offset=9, mode="L")
    splits = load_dataset(f"imagefolder:{tmp_path}", val_size=3)
    assert splits.input_shape == (1, 5, 6)


def test_missing_path_names_path_and_layout(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(f"imagefolder:{missing}")
    assert str(missing) in str(err.value) and "<path>/train/<class>/<image>" in str(err.value)


def test_mismatched_class_folders_fail(tmp_path):
    write_tree(tmp_path / "train", per_class=3, offset=0)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / "test" / "cat" / "x.png")
    with pytest.raises(ValueError, match="different class folders"):
        load_dataset(f"imagefolder:{tmp_path}", val_size=3)


def test_images_of_different_sizes_fail_naming_a_file(tmp_path):
    write_tree(tmp_path, per_class=4, offset=0)
    odd = tmp_path / "dog" / "zzz.png"
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(odd)
    with pytest.raises(ValueError, match="differ in size"):
        load_dataset(f"imagefolder:{tmp_path}", val_size=2, test_size=2)

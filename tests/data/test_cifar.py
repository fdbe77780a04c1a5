"""CIFAR-10/100 through torchvision's own classes on tiny local files written in its format.

torchvision checks every batch file against the md5 of the official release, so tiny fake
batches are (rightly) refused by the stock classes: we assert that refusal and its message. The
load path is then exercised with subclasses that differ only in the expected md5s (those of the
files written here); all parsing is torchvision's.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import CIFAR10, CIFAR100

from pcee.data import load_dataset
from pcee.data.cifar import CIFAR_CLASSES

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _batch(rng, n, num_classes, label_key):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in np.arange(n) % num_classes]
    return {"data": data, label_key: labels}


def write_fake_cifar10(root: Path, per_batch=20, test_n=30) -> tuple[type[CIFAR10], dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = _batch(rng, per_batch, 10, "labels")
    batches["test_batch"] = _batch(rng, test_n, 10, "labels")
    for name, content in batches.items():
        _dump(folder / name, content)
    _dump(folder / "batches.meta", {"label_names": CIFAR10_NAMES})

    class TinyCIFAR10(CIFAR10):
        train_list = [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")] for i in range(1, 6)]
        test_list = [["test_batch", _md5(folder / "test_batch")]]
        meta = {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")}

    return TinyCIFAR10, batches


def test_stock_class_refuses_files_that_are_not_the_official_release(tmp_path):
    write_fake_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path)
    message = str(err.value)
    assert "md5 differs from the official release" in message and "data_batch_1" in message
    assert str(tmp_path / "cifar-10-batches-py") in message


def test_cifar10_loads_through_torchvision(tmp_path, monkeypatch):
    tiny, batches = write_fake_cifar10(tmp_path)
    monkeypatch.setitem(CIFAR_CLASSES, "cifar10", tiny)
    splits = load_dataset("cifar10", root=tmp_path, seed=0, val_size=20)
    assert splits.class_names == CIFAR10_NAMES and splits.num_classes == 10
    assert splits.input_shape == (3, 32, 32)
    assert splits.sizes() == {"train": 80, "val": 20, "test": 30}  # official test set kept whole
    # Pixels: each pickle row is the R, G, B planes of one image; ours is (C, H, W) / 255.
    train_rows = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    expected = {row.tobytes() for row in train_rows}
    restored = np.round(np.concatenate([splits.train.x, splits.val.x]) * 255).astype(np.uint8).reshape(100, 3072)
    assert {row.tobytes() for row in restored} == expected
    test_rows = np.round(splits.test.x * 255).astype(np.uint8).reshape(30, 3072)
    np.testing.assert_array_equal(test_rows, batches["test_batch"]["data"])
    np.testing.assert_array_equal(splits.test.y, batches["test_batch"]["labels"])
    capped = load_dataset("cifar10", root=tmp_path, seed=0, val_size=20, test_size=10, train_size=40)
    assert capped.sizes() == {"train": 40, "val": 20, "test": 10}


def test_cifar100_loads_fine_labels(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    _dump(folder / "train", _batch(rng, 200, 100, "fine_labels"))
    _dump(folder / "test", _batch(rng, 100, 100, "fine_labels"))
    names = [f"class{i:02d}" for i in range(100)]
    _dump(folder / "meta", {"fine_label_names": names})

    class TinyCIFAR100(CIFAR100):
        train_list = [["train", _md5(folder / "train")]]
        test_list = [["test", _md5(folder / "test")]]
        meta = {**CIFAR100.meta, "md5": _md5(folder / "meta")}

    monkeypatch.setitem(CIFAR_CLASSES, "cifar100", TinyCIFAR100)
    splits = load_dataset("cifar100", root=tmp_path, val_size=100)
    assert splits.num_classes == 100 and splits.class_names == names
    assert splits.sizes() == {"train": 100, "val": 100, "test": 100}
    assert sorted(splits.val.y.tolist()) == list(range(100))  # stratified: one of each class


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_root_names_path_and_layout(tmp_path, name):
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err.value) and f"<root>/{folder}/" in str(err.value)
    with pytest.raises(FileNotFoundError, match="needs a local root"):
        load_dataset(name)


def test_missing_batch_is_named(tmp_path):
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3: missing"):
        load_dataset("cifar10", root=tmp_path)

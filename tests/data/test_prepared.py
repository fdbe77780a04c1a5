"""Prepared snapshots: exact round trip and identical bytes for identical input."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pcee.data import load_dataset
from pcee.data.prepared import save_prepared


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_round_trip_gives_identical_arrays(tmp_path):
    splits = load_dataset("digits", seed=2)
    out = save_prepared(splits, tmp_path / "data")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json"] + [f"{s}_{a}.npy" for s in ("train", "val", "test") for a in ("x", "y")]
    )
    back = load_dataset(f"prepared:{out}")
    assert back.name == "digits" and back.class_names == splits.class_names
    assert back.num_classes == 10 and back.input_shape == (1, 8, 8)
    for part in ("train", "val", "test"):
        a, b = getattr(splits, part), getattr(back, part)
        assert b.x.dtype == np.float32 and b.y.dtype == np.int64
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
    assert back.info["seed"] == 2 and back.info["source"] == "digits"


def test_same_input_gives_identical_bytes(tmp_path):
    first = save_prepared(load_dataset("digits"), tmp_path / "a")
    second = save_prepared(load_dataset("digits"), tmp_path / "b")  # a fresh load, another dir
    assert digest(first) == digest(second)
    changed = save_prepared(load_dataset("digits", seed=1), tmp_path / "c")
    assert digest(changed)["val_y.npy"] != digest(first)["val_y.npy"]


def test_cli_in_a_fresh_process_writes_the_same_bytes(tmp_path):
    in_process = save_prepared(load_dataset("digits"), tmp_path / "here")
    subprocess.run(
        [
            str(Path(sys.executable).parent / "pcee"),
            "data",
            "prepare",
            "--data",
            "digits",
            "--out",
            str(tmp_path / "there"),
        ],
        check=True,
        capture_output=True,
    )
    assert digest(tmp_path / "there") == digest(in_process)


def test_resave_replaces_atomically_and_leaves_no_temporaries(tmp_path):
    save_prepared(load_dataset("digits", seed=0), tmp_path / "data")
    save_prepared(load_dataset("digits", seed=5), tmp_path / "data")
    assert load_dataset(f"prepared:{tmp_path / 'data'}").info["seed"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_refuses_to_replace_a_directory_that_is_not_a_snapshot(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prepared snapshot"):
        save_prepared(load_dataset("digits"), tmp_path / "data")
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(FileExistsError, match="not a prepared snapshot"):
        save_prepared(load_dataset("digits"), tmp_path / "file")


def test_caps_apply_and_val_size_is_refused(tmp_path):
    out = save_prepared(load_dataset("digits"), tmp_path / "data")
    capped = load_dataset(f"prepared:{out}", train_size=200, test_size=50)
    assert capped.sizes() == {"train": 200, "val": 359, "test": 50}
    with pytest.raises(ValueError, match="fixed splits"):
        load_dataset(f"prepared:{out}", val_size=0.1)


def test_missing_snapshot_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(f"prepared:{tmp_path / 'nothing'}")
    assert str(tmp_path / "nothing") in str(err.value) and "meta.json" in str(err.value)

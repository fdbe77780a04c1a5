"""pcee.atomic: a failed write leaves the old file (or nothing) and no temporary behind."""

from __future__ import annotations

import json
import stat

import pytest

from pcee.atomic import atomic_file, write_json_atomic, write_text_atomic


def test_write_text_atomic_replaces_and_is_world_readable(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two ✓")
    assert path.read_text(encoding="utf-8") == "two ✓"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_atomic_file_failure_keeps_old_content_and_cleans_up(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(path) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("boom")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_file_failure_on_new_path_leaves_nothing(tmp_path):
    path = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_to_jsonable_numpy_and_nonfinite():
    import numpy as np

    from pcee.atomic import to_jsonable

    value = {"a": np.arange(2), "b": np.float32(0.5), "c": (np.bool_(True), float("nan")), 3: np.array([np.inf, 1.0])}
    assert to_jsonable(value)["a"] == [0, 1] and to_jsonable(value)["b"] == 0.5
    kept = to_jsonable(value)
    assert kept["c"][0] is True and kept["c"][1] != kept["c"][1] and kept["3"][0] == float("inf")
    strict = to_jsonable(value, nonfinite_as_null=True)
    assert strict["c"] == [True, None] and strict["3"] == [None, 1.0]
    json.dumps(strict, allow_nan=False)  # strict JSON readers accept it

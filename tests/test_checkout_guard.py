"""The suite's own guard: a file written into the checkout during a run fails the run (tests/conftest.py)."""

from __future__ import annotations

import os

from tests.conftest import checkout_changes, checkout_files


def test_new_changed_and_removed_files_are_reported_and_caches_are_not(tmp_path):
    (tmp_path / "kept.txt").write_text("a")
    (tmp_path / "changed.txt").write_text("a")
    (tmp_path / "gone.txt").write_text("a")
    (tmp_path / "src" / "__pycache__").mkdir(parents=True)
    before = checkout_files(tmp_path)
    assert set(before) == {"kept.txt", "changed.txt", "gone.txt"}

    (tmp_path / "changed.txt").write_text("ab")
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "prefect.toml").write_text("[api]")
    (tmp_path / "src" / "__pycache__" / "m.pyc").write_bytes(b"x")  # bytecode: the interpreter's, not a test's
    (tmp_path / ".pcee").mkdir()
    (tmp_path / ".pcee" / "own.log").write_text("a developer's services")
    assert checkout_changes(before, checkout_files(tmp_path)) == ["A prefect.toml", "M changed.txt", "D gone.txt"]


def test_a_rewrite_with_the_same_bytes_is_a_change(tmp_path):
    path = tmp_path / "data.dvc"
    path.write_text("md5: 1")
    before = checkout_files(tmp_path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert checkout_changes(before, checkout_files(tmp_path)) == ["M data.dvc"]

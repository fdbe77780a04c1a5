"""DVC edge: DVC-compatible md5, data.dvc, serialised commands, versioning in a real repo."""

import subprocess
import threading
import time
from pathlib import Path

import pytest

from pcee import dvc_repo
from pcee.data.datasets import load_dataset
from pcee.data.prepared import save_prepared

REPO = Path(__file__).resolve().parents[2]


def test_committed_data_dvc_matches_a_fresh_prepare(tmp_path):
    """Byte-deterministic preparation: re-preparing gives the md5 recorded in data.dvc."""
    save_prepared(load_dataset("digits"), tmp_path / "data")
    assert dvc_repo.directory_md5(tmp_path / "data") == dvc_repo.read_dvc_md5(REPO / "data.dvc")


def test_different_data_different_md5(tmp_path):
    save_prepared(load_dataset("digits", seed=0), tmp_path / "a")
    save_prepared(load_dataset("digits", seed=1), tmp_path / "b")
    assert dvc_repo.directory_md5(tmp_path / "a") != dvc_repo.directory_md5(tmp_path / "b")


def test_lock_serialises(tmp_path):
    spans = []

    def hold():
        with dvc_repo.dvc_lock(tmp_path):
            t0 = time.monotonic()
            time.sleep(0.2)
            spans.append((t0, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.integration
def test_version_data_in_a_real_repo_matches_dvc(monkeypatch, tmp_path):
    monkeypatch.setenv("PCEE_STATE_DIR", str(tmp_path / "state"))
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc_repo.run_dvc(["init", "-q"], repo)
    save_prepared(load_dataset("digits"), repo / "data")
    info = dvc_repo.version_data("data", repo)
    assert info["md5"] == dvc_repo.directory_md5(repo / "data") == dvc_repo.read_dvc_md5(repo / "data.dvc")
    assert "dvc-remote" in info["remote"] and any((tmp_path / "state" / "dvc-remote").rglob("*"))
    assert "state" in (repo / ".dvc" / "config.local").read_text()
    with pytest.raises(RuntimeError, match="dvc"):
        dvc_repo.run_dvc(["add", "no-such-dir"], repo)


def test_missing_snapshot_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pcee data prepare"):
        dvc_repo.version_data("nope", tmp_path)

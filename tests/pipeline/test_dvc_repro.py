"""`dvc repro` on a clean checkout reproduces the committed metrics; the re-prepared snapshot has
the md5 recorded in data.dvc (byte-deterministic preparation), so `dvc status` is clean for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_repro_in_a_clean_clone_matches_committed_metrics(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PYTHONPATH": str(clone / "src"),
        "OMP_NUM_THREADS": "1",
        "PCEE_STATE_DIR": str(tmp_path / "state"),
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
    }
    # a fresh clone has no data/ and an empty DVC cache: re-prepare the embedded data
    run([str(BIN / "pcee"), "data", "prepare", "--data", "digits", "--out", "data"], clone, env)
    # `dvc add` re-hashes data/ into the (empty) cache: data.dvc must come out byte-identical
    run([str(BIN / "dvc"), "add", "data"], clone, env)
    assert (
        subprocess.run(["git", "status", "--porcelain", "data.dvc"], cwd=clone, capture_output=True, text=True).stdout
        == ""
    )
    status = run([str(BIN / "dvc"), "status", "data.dvc"], clone, env)
    assert "changed" not in status.stdout, status.stdout
    # code or params changed since dvc.lock was committed? (a missing output is "deleted"/"not in cache")
    pending = json.loads(run([str(BIN / "dvc"), "status", "--json"], clone, env).stdout or "{}")
    stale = sorted(
        {
            path
            for entries in pending.values()
            for e in entries
            for path, why in e.get("changed deps", {}).items()
            if why == "modified"
        }
        | {k for entries in pending.values() for e in entries for k in e.get("changed params", {})}
    )
    run([str(BIN / "dvc"), "repro"], clone, env)
    metrics = {
        name: json.loads((clone / "reports" / "dvc" / name).read_text())
        for name in ("prepare.json", "calibrate.json", "sweep.json")
    }
    if stale:
        # the committed metrics belong to older code: check that a forced rerun gives the same bits instead
        print(f"dvc.lock is stale for {stale}: run `dvc repro` and commit dvc.lock + reports/dvc")
        run([str(BIN / "dvc"), "repro", "--force"], clone, env)
        want_all = {name: json.loads((clone / "reports" / "dvc" / name).read_text()) for name in metrics}
    else:
        want_all = {
            name: json.loads(
                subprocess.run(
                    ["git", "show", f"HEAD:reports/dvc/{name}"], cwd=clone, capture_output=True, text=True, check=True
                ).stdout
            )
            for name in metrics
        }
    for name, got in metrics.items():
        assert got == want_all[name], f"{name} differs after dvc repro"
    assert metrics["prepare.json"]["md5_matches"] is True
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], clone, env)
    assert "sweep.json" in shown.stdout and "calibrate.json" in shown.stdout
    plots = run([str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "plots")], clone, env)
    assert (tmp_path / "plots" / "index.html").is_file(), plots.stdout

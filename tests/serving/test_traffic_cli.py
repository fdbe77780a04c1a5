"""`pcee traffic` end to end: real HTTP requests (corrupted digits) to a real server, labels posted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_traffic_cli_sends_requests_and_feedback(server_factory, bundle_dir):
    srv = server_factory("--bundle", str(bundle_dir), "--poll-interval", "0")
    cmd = [
        sys.executable,
        "-m",
        "pcee.cli",
        "traffic",
        "--url",
        srv.url,
        "--data",
        "digits",
        "--split",
        "test",
        "--corruption",
        "gaussian_blur",
        "--severity",
        "3",
        "--n",
        "60",
        "--concurrency",
        "4",
        "--feedback-rate",
        "0.5",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert "gaussian_blur@3" in summary["traffic"]
    store = srv.store()
    assert store.count_requests() == 60
    # feedback for a fraction of the answers, each one stored once
    assert 0 < store.count_feedback() < 60
    store.dispose()


def test_traffic_cli_rejects_unknown_corruption(server_factory, bundle_dir):
    srv = server_factory("--bundle", str(bundle_dir), "--poll-interval", "0")
    proc = subprocess.run(
        [sys.executable, "-m", "pcee.cli", "traffic", "--url", srv.url, "--corruption", "fog", "--n", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown corruption 'fog'" in proc.stderr and "gaussian_noise" in proc.stderr
    assert srv.store().count_requests() == 0

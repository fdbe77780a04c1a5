"""``<state>/env.sh`` is complete: a new shell that sources it (and has nothing else of ``make up``'s
environment) gets the same engines, stores and URLs; a client pointed at a state directory that
``make up`` never used fails naming ``PCEE_STATE_DIR`` and writes nothing (no new password)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pcee.settings import Settings
from pcee.stack import default_traffic_url, postgres, s3
from pcee_dev.services import manager as services

PROBE = (
    "import json; from pcee.settings import Settings; from pcee.stack import default_traffic_url, s3; s = Settings(); "
    "print(json.dumps([s.db, s.artifacts, s.task_runner, s.serve_replicas, s.serve_port, s.stats_port(), s.mlflow_port, "
    "default_traffic_url(s), s3.client_env(s), s.dask_address]))"
)


def test_a_new_shell_gets_the_same_urls(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith(("PCEE_", "AWS_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PCEE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PCEE_SCALE_OUT", "1")
    monkeypatch.setenv("PCEE_POSTGRES_PORT", "15432")
    monkeypatch.setenv("PCEE_SERVE_PORT", "18200")
    monkeypatch.setenv("PCEE_MLFLOW_PORT", "15000")
    cfg = services.load_config()  # as make up: the password and the S3 keys are generated here, once
    services.write_client_files(cfg, [])
    env_sh = cfg.state_dir / "env.sh"
    assert services.recorded_env()["PCEE_MLFLOW_PORT"] == "15000"  # what status/stop/restart fall back on
    s = Settings()
    want = [
        "postgres",
        "s3",
        "dask",
        2,
        18200,
        18203,
        15000,
        default_traffic_url(s),
        s3.client_env(s),
        f"tcp://127.0.0.1:{s.dask_scheduler_port}",
    ]
    # a new shell: only PATH and HOME, then `source env.sh`
    out = subprocess.run(
        ["bash", "-c", f"source {env_sh} && {sys.executable} -c '{PROBE}'"],
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == want


def test_a_state_dir_make_up_never_used_is_an_error_naming_it(tmp_path):
    nowhere = tmp_path / "not-the-state-dir"
    s = Settings(state_dir=nowhere, db="postgres", artifacts="s3")
    with pytest.raises(postgres.PostgresError, match="PCEE_STATE_DIR"):
        default_traffic_url(s)
    with pytest.raises(s3.S3Error, match="PCEE_STATE_DIR"):
        s3.client_env(s)
    assert not nowhere.exists()  # nothing written: no new password, no new keys

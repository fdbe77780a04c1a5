"""``make up``'s scale-out hooks keep listing a service while it runs (its PID file), whatever the
environment says when ``make down`` or ``make status`` runs: ``PCEE_SCALE_OUT=1 make up`` then a
plain ``make down`` stops PostgreSQL, the S3 server and the Dask processes too."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCALE_VARS = ("PCEE_SCALE_OUT", "PCEE_DB", "PCEE_ARTIFACTS", "PCEE_TASK_RUNNER", "PCEE_DASK_ADDRESS")


@dataclass
class Cfg:
    state_dir: Path

    def client_env(self) -> dict[str, str]:
        return {"PCEE_STATE_DIR": str(self.state_dir)}


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(
        f"pcee_services_{name}_hooks_test", REPO / "scripts" / "services.d" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("hook", "pid_name"), [("postgres", "postgres"), ("s3", "s3"), ("dask", "dask-scheduler")])
def test_listed_while_running_whatever_the_environment(hook, pid_name, tmp_path, monkeypatch):
    for var in SCALE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PCEE_STATE_DIR", str(tmp_path))
    cfg = Cfg(tmp_path)
    module = _hook(hook)
    assert module.specs(cfg) == []  # the default stack: nothing of this engine
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / f"{pid_name}.pid").write_text("123 456\n")
    assert pid_name in [s["name"] for s in module.specs(cfg)]  # still there for down/status
    monkeypatch.setenv("PCEE_SCALE_OUT", "1")
    (tmp_path / "pids" / f"{pid_name}.pid").unlink()
    assert pid_name in [s["name"] for s in module.specs(cfg)]  # and listed when asked for

"""``make up``'s scale-out hooks list their engine's services when the settings ask for it, and
nothing for the default stack. (What runs is supervisord's list: ``make down`` and ``make status``
see a service ``PCEE_SCALE_OUT=1 make up`` started whatever the environment says later;
``tests/pipeline/test_services.py``.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pcee_dev.services.hooks import dask, postgres, s3

SCALE_VARS = ("PCEE_SCALE_OUT", "PCEE_DB", "PCEE_ARTIFACTS", "PCEE_TASK_RUNNER", "PCEE_DASK_ADDRESS")


@dataclass
class Cfg:
    state_dir: Path

    def client_env(self) -> dict[str, str]:
        return {"PCEE_STATE_DIR": str(self.state_dir)}


@pytest.mark.parametrize(("hook", "name"), [(postgres, "postgres"), (s3, "s3"), (dask, "dask-scheduler")])
def test_listed_only_when_asked_for(hook, name, tmp_path, monkeypatch):
    for var in SCALE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PCEE_STATE_DIR", str(tmp_path))
    assert hook.specs(Cfg(tmp_path)) == []  # the default stack: nothing of this engine
    monkeypatch.setenv("PCEE_SCALE_OUT", "1")
    assert name in [s["name"] for s in hook.specs(Cfg(tmp_path))]

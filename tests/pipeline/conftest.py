"""Session stack for the pipeline's integration tests: a real Prefect server, a real MLflow server
and the serve process (flows/serve.py), on free ports, with every bit of state under tmp paths,
over a throwaway git+DVC project holding the digits snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcee_dev.proc import free_port as free_port  # re-exported for the pipeline tests
from pcee_dev.services import manager as services

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class Stack:
    def __init__(self, root: Path):
        self.root = root
        self.state = root / "state"
        self.project = root / "project"
        self.env: dict[str, str] = {}
        self.startup_s: dict[str, float] = {}

    def run(self, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        """A command with the stack's environment (e.g. the prefect CLI)."""
        proc = subprocess.run(
            list(args),
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.project,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def deployment_run(self, name: str, timeout: float = 300, **params) -> subprocess.CompletedProcess:
        args = [str(BIN / "prefect"), "deployment", "run", name, "--watch"]
        for k, v in params.items():
            args += ["--param", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        return self.run(*args, timeout=timeout)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"], registry_uri=self.env["MLFLOW_TRACKING_URI"])

    def aliases(self, name: str) -> dict:
        out = {}
        for alias in ("challenger", "champion", "previous"):
            try:
                out[alias] = str(self.client().get_model_version_by_alias(name, alias).version)
            except Exception:  # noqa: BLE001 - alias not set
                out[alias] = None
        return out

    def versions(self, name: str) -> list:
        return sorted(
            (mv for mv in self.client().search_model_versions(f"name='{name}'")), key=lambda mv: int(mv.version)
        )


def make_project(project: Path) -> None:
    """A git repo with DVC initialised and the digits snapshot in data/ (as a fresh clone would)."""
    from pcee.data.datasets import load_dataset
    from pcee.data.prepared import save_prepared

    project.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=project, check=True)
    save_prepared(load_dataset("digits"), project / "data")


@pytest.fixture(scope="package")  # stopped once this package's tests are done, not left running to the end
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("pcee-stack")
    st = Stack(root)
    make_project(st.project)
    env = {
        "PCEE_STATE_DIR": str(st.state),
        "PCEE_PROJECT_DIR": str(st.project),
        "PCEE_PREFECT_PORT": str(free_port()),
        "PCEE_MLFLOW_PORT": str(free_port()),
        "PREFECT_HOME": str(st.state / "prefect"),
        "MPLCONFIGDIR": str(st.state / "matplotlib"),
        "DVC_SITE_CACHE_DIR": str(st.state / "dvc-site-cache"),
        "PCEE_TASK_WORKERS": "2",
        "OMP_NUM_THREADS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    saved = dict(os.environ)
    os.environ.update(env)
    cfg = services.load_config()
    try:
        t0 = time.monotonic()
        st.startup_s = services.up(cfg)
        st.startup_s["total"] = time.monotonic() - t0
        st.env = {**env, **cfg.client_env()}
        os.environ.update(st.env)
        yield st
    finally:
        services.down(cfg)
        for k in {*env, *st.env, "PREFECT_API_URL", "MLFLOW_TRACKING_URI"}:  # back to what the later tests expect
            if k in saved:
                os.environ[k] = saved[k]
            else:
                os.environ.pop(k, None)

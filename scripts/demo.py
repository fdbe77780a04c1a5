#!/usr/bin/env python
"""``make demo`` after ``make up``: make sure ``data/`` is the snapshot recorded in ``data.dvc``,
run the ``train`` flow through the Prefect server (deployment ``train/manual``), then print the
sweep table, the chosen δ, the champion version and the UI URLs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pcee.settings import Settings
from pcee_dev.demo_settings import DemoSettings

REPO = Path(__file__).resolve().parents[1]


def ensure_data(project: Path) -> str:
    """``data/`` of the DVC project the flows version (``PCEE_PROJECT_DIR``, this checkout by default)."""
    from pcee.dvc_repo import directory_md5, read_dvc_md5

    data = project / "data"
    if not data.is_dir():
        print("data/ missing: re-preparing the embedded digits snapshot (byte-deterministic)")
        subprocess.run(
            [sys.executable, "-m", "pcee.cli", "data", "prepare", "--data", "digits", "--out", str(data)],
            check=True,
            cwd=REPO,
        )
    md5 = directory_md5(data)
    recorded = read_dvc_md5(project / "data.dvc") if (project / "data.dvc").is_file() else None
    print(f"data/ md5 {md5} ({'matches data.dvc' if md5 == recorded else f'data.dvc records {recorded}'})")
    return md5


def main() -> int:
    settings = Settings()
    info = json.loads((settings.state_dir / "services.json").read_text())
    os.environ["PREFECT_API_URL"] = info["prefect_api_url"]
    os.environ["MLFLOW_TRACKING_URI"] = info["mlflow_tracking_uri"]
    ensure_data(settings.project_dir)
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    epochs = DemoSettings().epochs
    t0 = time.monotonic()
    run = run_deployment("train/manual", parameters={"epochs": epochs}, timeout=None)
    elapsed = time.monotonic() - t0
    print(f"\ntrain/manual flow run {run.name} ({run.id}): {run.state.type.value} in {elapsed:.0f}s")
    if not run.state.is_completed():
        print(
            f"the flow failed: {run.state.message}; see {info['prefect_ui_url']}/runs/flow-run/{run.id}",
            file=sys.stderr,
        )
        return 1
    import asyncio

    async def report() -> str:
        async with get_client() as client:
            art = await client.read_latest_artifacts()
            for a in art:
                if a.key == "pcee-train-report" and a.flow_run_id == run.id:
                    return a.data
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pcee-train-report"]))
            )
            return next((a.data for a in arts if a.flow_run_id == run.id), "(no report artifact)")

    print(asyncio.run(report()))
    from pcee.registry import aliases
    from pcee.registry.tracking import client

    names = [m.name for m in client().search_registered_models() if m.name.startswith("pcee-")]
    for name in names:
        print(f"\n{name}: aliases {aliases(name)}")
    print(
        f"\nPrefect UI: {info['prefect_ui_url']}/runs/flow-run/{run.id}\nMLflow UI:  {info['mlflow_tracking_uri']}/#/models"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

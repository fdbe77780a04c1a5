"""Download a registered version's bundle artifact (weights, maps, policy, FLOPs) to a local dir."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pcee.registry.tracking import tracking_uri


def _find_bundle(root: Path) -> Path | None:
    for cand in sorted(root.rglob("policy.json")):
        if (cand.parent / "model.json").is_file():
            return cand.parent
    return None


def fetch_bundle(name: str, version: str, dst: str | Path) -> Path:
    """``models:/<name>/<version>``'s bundle under ``dst`` (downloaded once, atomically)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    dst = Path(dst)
    target = dst / name / str(version)
    found = _find_bundle(target) if target.is_dir() else None
    if found:
        return found
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=target.parent))
    try:
        # Resolve the version through an explicit registry client: ``download_artifacts`` would
        # resolve ``models:/`` with the process-global registry URI, which need not be ours.
        uri = tracking_uri()
        source = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(name, str(version))
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=uri)
        if _find_bundle(tmp) is None:
            raise FileNotFoundError(f"models:/{name}/{version} holds no bundle (policy.json + model.json)")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _find_bundle(target)

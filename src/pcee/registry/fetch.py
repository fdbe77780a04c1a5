"""Download a registered version's bundle artifact (weights, maps, policy, FLOPs) to a local dir.

The one place that turns ``models:/<name>/<version>`` into a bundle directory on disk; the flows
(through ``tasks.registry``) and the HTTP service (``MlflowAliasSource``) both use it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

#: the pyfunc artifact that holds the model bundle (``log_and_register`` logs it under this key)
BUNDLE_ARTIFACT = "bundle"


def _is_bundle(path: Path) -> bool:
    return (path / "model.json").is_file() and (path / "policy.json").is_file()


def find_bundle(root: Path) -> Path | None:
    """The bundle inside a downloaded pyfunc model: the MLmodel's ``bundle`` artifact, else any
    directory holding model.json + policy.json."""
    if not root.is_dir():
        return None
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        import yaml

        spec = yaml.safe_load(mlmodel.read_text()) or {}
        arts = (spec.get("flavors", {}).get("python_function", {}) or {}).get("artifacts", {}) or {}
        rel = (arts.get(BUNDLE_ARTIFACT) or {}).get("path")
        if rel and _is_bundle(root / rel):
            return root / rel
    if _is_bundle(root):
        return root
    for cand in sorted(root.rglob("model.json")):
        if _is_bundle(cand.parent):
            return cand.parent
    return None


def fetch_bundle(name: str, version: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """``models:/<name>/<version>``'s bundle under ``dst/<name>/<version>`` (downloaded once, atomically).

    ``tracking_uri`` (default: :func:`pcee.registry.tracking.tracking_uri`) is also the registry.
    Raises FileNotFoundError if the version holds no bundle; MLflow's errors pass through.
    """
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    target = Path(dst) / name / str(version)
    found = find_bundle(target)
    if found:
        return found
    if tracking_uri is None:
        from pcee.registry.client import tracking_uri as recorded_uri  # mlflow's modules load with it

        tracking_uri = recorded_uri()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=target.parent))
    try:
        # Resolve the version through an explicit registry client: ``download_artifacts`` would
        # resolve ``models:/`` with the process-global registry URI, which need not be ours.
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        source = client.get_model_version_download_uri(name, str(version))
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri)
        if find_bundle(tmp) is None:
            raise FileNotFoundError(
                f"models:/{name}/{version} has no '{BUNDLE_ARTIFACT}' artifact with a model bundle (model.json, policy.json)"
            )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # a half-downloaded version is never seen as cached
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bundle = find_bundle(target)
    if bundle is None:  # it was found in the download just renamed to target
        raise FileNotFoundError(f"the bundle of models:/{name}/{version} is missing from {target} after download")
    return bundle

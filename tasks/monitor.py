"""Tasks of the ``monitor`` flow (flows/monitor.py): the champion, its reference, the live window, MLflow.

Thin wrappers over the library: the registry (:mod:`pcee.registry`), the traffic store
(:mod:`pcee.traffic.store`), the bundle, and the monitor's reference (:mod:`monitoring.reference`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import task

from monitoring.reference import reference_from_logits
from pcee.atomic import write_text_atomic
from pcee.bundle import ModelBundle
from pcee.few_labels import schedule
from pcee.outputs import ExitOutputs
from pcee.registry.aliases import alias_version, registered_models
from pcee.registry.tracking import tracking_uri
from pcee.selective import summarize
from pcee.settings import Settings
from pcee.traffic.store import TrafficStore
from pcee.verification import Verification
from tasks import IO_RETRIES, IO_RETRY_DELAY_S

#: MLflow metrics of the window's selective answering (None values are not logged)
SELECTIVE_METRICS = (
    "coverage",
    "abstained",
    "deferred",
    "deferral_failed",
    "answered_accuracy_measured",
    "answered_accuracy_estimated",
    "n_labelled_answered",
)


@task(name="champion-model-name", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def champion_model_name() -> str:
    """The one registered model with a champion (the monitor's default); an error when there are none or several."""

    names = [n for n in registered_models() if alias_version(n, "champion")]
    if len(names) != 1:
        raise ValueError(f"pass model_name: registered models with a champion: {names or 'none'}")
    return names[0]


@task(name="load-reference", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def load_reference(bundle_dir: str):
    """(reference confidences (N, L), reference exits (N,), policy) from a bundle directory."""

    bundle = ModelBundle.load(bundle_dir)
    ref_path = Path(bundle_dir) / "reference.npz"
    if not ref_path.is_file():
        raise FileNotFoundError(
            f"bundle {bundle_dir} has no reference.npz: the monitor needs the champion's validation outputs"
        )
    ref = ExitOutputs.load(ref_path)
    conf, exits = reference_from_logits(ref.logits, bundle.policy)
    return conf, exits


@task(name="read-window", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def read_window(version: str, window: int, window_minutes: float | None):

    store = TrafficStore.from_settings(Settings())
    try:
        if window_minutes:
            now = datetime.now(UTC)
            return store.recent_confidences(
                since=now - timedelta(minutes=window_minutes), until=now, model_version=version
            )
        return store.recent_confidences(last=window, model_version=version)
    finally:
        store.dispose()


@task(name="read-selective", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def read_selective(version: str, live) -> dict:
    """The selective-answering summary of exactly the rows of ``live`` (the window just read).

    The store's window is bounded by the first and last row's times and cut to the same count, so
    a request logged after the window was read does not enter it."""

    store = TrafficStore.from_settings(Settings())
    try:
        summary = store.selective_window(
            last=len(live), since=live.times[0], until=live.times[-1] + timedelta(microseconds=1), model_version=version
        )
    finally:
        store.dispose()
    if summary.n != len(live) or summary.answered != sum(d == "answered" for d in live.decisions):
        # rows logged with out-of-order times moved the window: fall back to the window's own rows (no labels)
        summary = summarize(live.decisions, live.expected_accuracy)
    return summary.to_dict()


@task(name="log-monitor-report", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def log_to_mlflow(model_name: str, version: str, json_path: str, html_path: str, summary: dict) -> str | None:
    """Log the window's report files and its p-values to MLflow; returns the run id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("pcee-monitor")
    with mlflow.start_run(run_name=f"monitor-{model_name}-v{version}") as run:
        mlflow.set_tags(
            {"model_name": model_name, "model_version": version, "drifted": str(summary["drifted"]), "flow": "monitor"}
        )
        mlflow.log_params({"method": summary["method"], "alpha": summary["alpha"], "n_live": summary["n_live"]})
        metrics = {f"p_value.{c['column']}": c["p_value"] for c in summary["columns"]}
        metrics.update({f"ks_statistic.{c['column']}": c["statistic"] for c in summary["columns"]})
        metrics["drifted"] = float(summary["drifted"])
        selective = summary.get("selective") or {}
        metrics.update({k: float(selective[k]) for k in SELECTIVE_METRICS if selective.get(k) is not None})
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(json_path, artifact_path="drift_report")
        mlflow.log_artifact(html_path, artifact_path="drift_report")
        return run.info.run_id


@task(name="label-requests", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S)
def label_requests(bundle_dir: str, version: str, out_path: str, seed: int = 0) -> dict | None:
    """Active labelling: while the served version waits for labels (a label-free version after a drift
    alarm), the request ids it wants labelled — a seeded uniform sample of its requests without feedback,
    enough to reach the label budget twice over — written to ``out_path`` (JSON) and returned with the
    label count and the next look of the schedule (:mod:`pcee.few_labels`); None when it waits for nothing."""
    import json

    meta = json.loads((Path(bundle_dir) / "meta.json").read_text())
    verification = Verification.from_meta(meta)
    if not verification.waiting_for_labels or verification.label_budget is None:
        return None
    budget = int(verification.label_budget)
    store = TrafficStore.from_settings(Settings())
    try:
        n = store.count_labels(version)
        wanted = store.unlabelled_ids(version, limit=max(0, 2 * budget - n), seed=seed)
    finally:
        store.dispose()
    looks = [k for k, _ in schedule(budget)]
    info = {
        "model_version": str(version),
        "verification": verification.status,
        "labels": verification.labels_line(n),
        "n_labels": n,
        "label_budget": budget,
        "reached_look": max([k for k in looks if k <= n], default=0),
        "next_look": min([k for k in looks if k > n], default=None),
        "wanted_request_ids": wanted,
    }
    write_text_atomic(Path(out_path), json.dumps(info, indent=2))
    return info

"""``monitor`` flow: one drift check of the served champion's live confidences.

Deployment ``monitor/<interval>`` (default ``monitor/1m``, ``PCEE_MONITOR_INTERVAL_S``) runs it on
an interval schedule from the single serve process (``flows/serve.py`` picks up ``deployments()``).

Each run: read the champion version and its reference (the bundle's ``reference.npz``: the
validation outputs, or after a recalibration the recent rows the maps were refit on), take the
last ``window`` requests that this version answered from the traffic store (a count window; or the
last ``window_minutes`` minutes, a time window), test them with :class:`monitoring.monitor.DriftMonitor`,
write the HTML + JSON report under ``$PCEE_STATE_DIR/monitor/<model>/`` and log both to MLflow
(experiment ``pcee-monitor``), and on drift emit ``pcee.drift.detected``.

The same window's selective answering (``TrafficStore.selective_window``: requests answered,
abstained, deferred, deferral_failed, coverage, accuracy on answered requests measured on the
labelled ones and estimated from their expected accuracies) goes into the report, the MLflow
metrics, the Prefect artifact, the flow's return value (``selective``) and the drift event's
payload. It is reported, not alarmed on: the drift alarm is the KS test alone.

A drift event is emitted at most once per champion version per ``cooldown_minutes``: the same
drifted traffic stays in the window for several ticks, and one recalibration is what it needs.
A window with no new request since the last check is skipped.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import flow, get_run_logger

from flows._common import MODULE_PATH
from monitoring.events import LABELS_EVENT, drift_payload, emit_drift_event
from monitoring.monitor import DriftMonitor
from pcee.atomic import write_text_atomic
from pcee.settings import Settings
from tasks import registry as R
from tasks.monitor import (
    champion_model_name,
    label_requests,
    load_reference,
    log_to_mlflow,
    read_selective,
    read_window,
)
from tasks.report import publish_report


def _state_dir() -> Path:
    return Settings().state_dir


def interval_name(seconds: int) -> str:
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def deployment_name(settings: Settings | None = None) -> str:
    """``monitor/<interval>``: the deployment ``make up`` registers (``PCEE_MONITOR_INTERVAL_S``, default 60 s)."""
    return f"monitor/{interval_name((settings or Settings()).monitor_interval_s)}"


def _selective_md(sel: dict | None) -> str:
    if not sel:
        return ""

    def f(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    return (
        "\n\n**selective answering** (reported, not part of the alarm)\n\n"
        "| requests | answered | abstained | deferred | deferral failed | coverage | "
        "accuracy on answered, measured (n labelled) | accuracy on answered, estimated |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {sel['n']} | {sel['answered']} | {sel['abstained']} | {sel['deferred']} | {sel['deferral_failed']} | "
        f"{f(sel['coverage'])} | {f(sel['answered_accuracy_measured'])} ({sel['n_labelled_answered']}) | "
        f"{f(sel['answered_accuracy_estimated'])} |\n\n"
        f"labels skipped (not a class of the answering model): {sel.get('n_impossible_labels', 0)}"
    )


def _cursor_path(model_name: str) -> Path:
    return _state_dir() / "monitor" / model_name / "cursor.json"


def _read_cursor(model_name: str) -> dict:
    path = _cursor_path(model_name)
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_cursor(model_name: str, cursor: dict) -> None:

    write_text_atomic(_cursor_path(model_name), json.dumps(cursor, indent=2))


@flow(name="monitor", log_prints=True)
def monitor(
    model_name: str | None = None,
    window: int = 200,
    window_minutes: float | None = None,
    alpha: float = 0.01,
    min_window: int = 50,
    cooldown_minutes: float = 10.0,
    log_mlflow: bool = True,
) -> dict:
    """Test the last window of the champion's traffic for drift; emit ``pcee.drift.detected`` on drift."""

    log = get_run_logger()
    name = model_name or champion_model_name()
    version = R.read_aliases(name)["champion"]
    if version is None:
        raise ValueError(f"model {name!r} has no champion version to monitor")
    cursor = _read_cursor(name)
    labels = _labels(name, str(version), cursor)  # labels may arrive without new traffic
    live = read_window(str(version), window, window_minutes)
    if not len(live):
        log.info("%s v%s: no traffic in the window", name, version)
        return {"model_name": name, "version": version, "status": "no_traffic", "labels": labels}
    last_id = live.ids[-1]
    if cursor.get("version") == version and cursor.get("last_id") == last_id:
        log.info("%s v%s: no new request since the last check", name, version)
        return {"model_name": name, "version": version, "status": "no_new_traffic", "labels": labels}

    bundle_dir = R.fetch_bundle(name, version, str(_state_dir() / "bundles"))
    ref_conf, ref_exits = load_reference(bundle_dir)
    window_info = {
        "start": live.times[0].isoformat(),
        "end": live.times[-1].isoformat(),
        "first_id": live.ids[0],
        "last_id": last_id,
        "n": len(live),
        "kind": "time" if window_minutes else "count",
        "model_version": str(version),
    }
    selective = read_selective(str(version), live)
    report = DriftMonitor(ref_conf, ref_exits, alpha=alpha, min_window=min_window).check(
        live.confidences, live.exits, window_info, selective=selective
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    json_path, html_path = report.write(_state_dir() / "monitor" / name / "reports", f"{stamp}-v{version}")
    summary = report.to_dict()
    run_id = log_to_mlflow(name, str(version), str(json_path), str(html_path), summary) if log_mlflow else None

    event_id = _alarm(name, version, report, cursor, cooldown_minutes)
    cursor.update(version=version, last_id=last_id, last_check=datetime.now(UTC).isoformat())
    _write_cursor(name, cursor)

    md = (
        _report_md(name, version, window_info, alpha, summary)
        + f"report: `{json_path}`; MLflow run `{run_id}`; event `{event_id}`"
    )
    publish_report(
        md, key=f"pcee-drift-{name}".lower(), description=f"{name} v{version}: {'drift' if report.drifted else 'ok'}"
    )
    return {
        "model_name": name,
        "version": version,
        "status": "drift" if report.drifted else "ok",
        "event_id": event_id,
        "report_json": str(json_path),
        "report_html": str(html_path),
        "mlflow_run_id": run_id,
        "labels": labels,
        **summary,
    }


def _alarm(name: str, version, report, cursor: dict, cooldown_minutes: float) -> str | None:
    """Emit ``pcee.drift.detected`` for a drifted window unless this version alarmed within the cooldown."""

    log = get_run_logger()
    now = datetime.now(UTC)
    last_alarm = cursor.get("alarms", {}).get(str(version))
    cooling = last_alarm is not None and now - datetime.fromisoformat(last_alarm) < timedelta(minutes=cooldown_minutes)
    if not report.drifted:
        return None
    if cooling:
        log.info("drift persists on %s v%s; event already emitted at %s (cooldown)", name, version, last_alarm)
        return None
    event_id = emit_drift_event(name, drift_payload(report, name, version))
    cursor.setdefault("alarms", {})[str(version)] = now.isoformat()
    p = report.primary
    log.warning(
        "drift detected on %s v%s (%s p=%.3g): emitted pcee.drift.detected %s",
        name,
        version,
        p.column,
        p.p_value,
        event_id,
    )
    return event_id


def _report_md(name: str, version, window_info: dict, alpha: float, summary: dict) -> str:
    """The Prefect artifact of one check: the per-exit tests, the exit histogram, selective answering."""
    rows = "\n".join(
        f"| {c['column']} | {c['n_live']} | {c['statistic']:.3f} | {c['p_value']:.3g} | {c['threshold']:.3g} | {c['drifted']} |"
        for c in summary["columns"]
    )
    return (
        f"# drift check: {name} v{version}\n\nwindow {window_info['start']} → {window_info['end']} ({window_info['n']} "
        f"requests), KS, family-wise α={alpha}: **{'DRIFT' if summary['drifted'] else 'no drift'}**\n\n"
        f"| column | n live | KS D | p-value | threshold | drift |\n|---|---|---|---|---|---|\n{rows}\n\n"
        f"exit histogram live {summary['exit_histogram']['live']} vs reference {summary['exit_histogram']['reference']}"
        f"{_selective_md(summary['selective'])}\n\n"
    )


def _labels(name: str, version: str, cursor: dict) -> dict | None:
    """While the champion waits for labels: the ids it wants labelled (``labels_wanted.json`` beside the
    reports) and, once a new look of its label schedule is reached, ``pcee.labels.ready`` (the recalibrate
    deployment's few-label step), once per look and version."""

    bundle_dir = R.fetch_bundle(name, version, str(_state_dir() / "bundles"))
    info = label_requests(str(bundle_dir), version, str(_state_dir() / "monitor" / name / "labels_wanted.json"))
    if info is None or info["reached_look"] <= int(cursor.get("looks", {}).get(version, 0)):
        return info
    payload = {
        "model_name": name,
        "model_version": version,
        **{k: v for k, v in info.items() if k != "wanted_request_ids"},
    }
    info["event_id"] = emit_drift_event(name, payload, LABELS_EVENT)
    cursor.setdefault("looks", {})[version] = info["reached_look"]
    _write_cursor(name, cursor)
    get_run_logger().warning(
        "%s v%s: %s, look at %d labels reached: emitted %s",
        name,
        version,
        info["labels"],
        info["reached_look"],
        LABELS_EVENT,
    )
    return info


def deployments() -> list:
    """``monitor/<interval>`` on an interval schedule (picked up by ``flows/serve.py``)."""
    interval = Settings().monitor_interval_s
    return [
        monitor.to_deployment(
            name=interval_name(interval),
            entrypoint_type=MODULE_PATH,
            interval=interval,
            concurrency_limit=1,
            description="drift check of the champion's live confidences (Evidently KS); emits pcee.drift.detected",
        )
    ]


if __name__ == "__main__":
    print(monitor())

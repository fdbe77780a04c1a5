"""The drift event: ``pcee.drift.detected``, emitted to the Prefect API an automation listens on.

The resource is the served model (``pcee.model.<registered name>``), so one automation can match
every model (``pcee.model.*``) or one by name. The payload carries what the recalibration flow
needs to find the drift window in the traffic store, and the evidence; when the monitor had the
window's selective-answering summary, also its coverage and accuracy on answered requests
(``measured`` on labelled answered rows, ``estimated`` as their mean expected accuracy) and the
whole summary under ``selective``.
"""

from __future__ import annotations

from typing import Any

DRIFT_EVENT = "pcee.drift.detected"
#: a label-free version waiting for labels reached a look of its label schedule (pcee.few_labels)
LABELS_EVENT = "pcee.labels.ready"


def model_resource_id(model_name: str) -> str:
    return f"pcee.model.{model_name}"


def drift_payload(report: Any, model_name: str, model_version: str | int | None) -> dict[str, Any]:
    """JSON-able payload from a :class:`monitoring.monitor.WindowReport` that drifted."""
    primary = report.primary
    selective = getattr(report, "selective", None) or {}
    return {
        "model_name": model_name,
        "model_version": None if model_version is None else str(model_version),
        "window": report.window,
        "window_start": report.window.get("start"),
        "window_end": report.window.get("end"),
        "n_requests": report.n_live,
        "column": primary.column if primary else None,
        "method": report.method,
        "statistic": primary.statistic if primary else None,
        "p_value": primary.p_value if primary else None,
        "threshold": primary.threshold if primary else None,
        "columns": {
            c.column: {"p_value": c.p_value, "statistic": c.statistic, "drifted": c.drifted} for c in report.columns
        },
        "coverage": selective.get("coverage"),
        "answered_accuracy_measured": selective.get("answered_accuracy_measured"),
        "answered_accuracy_estimated": selective.get("answered_accuracy_estimated"),
        "n_labelled_answered": selective.get("n_labelled_answered"),
        "selective": dict(selective) if selective else None,
    }


def emit_drift_event(model_name: str, payload: dict[str, Any], event_name: str = DRIFT_EVENT) -> str:
    """Emit ``pcee.drift.detected`` (or ``event_name``, e.g. :data:`LABELS_EVENT`) for ``model_name``;
    returns the event id.

    Raises RuntimeError when no Prefect API is configured (events would be silently dropped,
    and then no automation could ever react).
    """
    from prefect.events import emit_event  # Prefect only here in monitoring/

    event = emit_event(
        event=event_name,
        resource={"prefect.resource.id": model_resource_id(model_name), "prefect.resource.name": model_name},
        payload=payload,
    )
    if event is None:
        raise RuntimeError(
            "Prefect did not emit the drift event: no events client (set PREFECT_API_URL to the Prefect server)"
        )
    return str(event.id)

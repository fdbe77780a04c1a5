"""A logged request for the tests that write the traffic store by hand."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pcee.traffic.store import RequestRecord, new_request_id

#: what a test does not care about: one exit of one model version, answered
DEFAULTS: dict[str, Any] = {
    "model_version": "1",
    "delta": 0.9,
    "policy": "pcee",
    "exit": 0,
    "prediction": 0,
    "confidence": 0.5,
    "expected_accuracy": 0.5,
    "confidences": [0.5],
    "flops": 1.0,
    "latency_ms": 1.0,
}


def request_record(**fields: Any) -> RequestRecord:
    """A :class:`RequestRecord` with a new id, the time now and :data:`DEFAULTS`; ``fields`` override them."""
    return RequestRecord(**{"id": new_request_id(), "time": datetime.now(UTC), **DEFAULTS, **fields})

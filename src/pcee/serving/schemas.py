"""Request and response bodies of the HTTP service, as pydantic models (they are its OpenAPI schema).

``/feedback`` requests are validated with :class:`FeedbackRequest`. ``/predict`` inputs are checked
with numpy in :mod:`pcee.serving.inputs` (a pydantic pass over up to 256 images of nested lists
would cost more than the model), so :func:`predict_request_schema` only documents them.

The request schemas state the served model's contract: :func:`predict_request_schema` (the input
shape, pixels in [0, 1], at most ``max_samples`` samples) and :func:`feedback_request_schema` (a label
in [0, num_classes), a UUID request id). The app rebuilds its OpenAPI document from them whenever the
served version changes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorResponse(BaseModel):
    """Every refused or failed request."""

    error: str = Field(description="what is wrong and what is accepted")
    status: int = Field(description="the HTTP status code, repeated")


class PredictAnswer(BaseModel):
    """One sample's answer; ``prediction`` is the best guess whatever the decision."""

    request_id: str = Field(description="id of the logged row; send it back with /feedback")
    prediction: int
    exit: int = Field(description="the exit that answered (0-based)")
    confidence: float
    expected_accuracy: float
    flops: float
    model_version: str
    delta: float | None
    answered: bool
    abstained: bool
    deferred: bool = Field(description="answered by the fallback service")
    deferral_failed: bool = Field(description="the fallback did not answer: the prediction is this model's")
    answer_threshold: float
    answer_mode: str
    shadow: bool = Field(description="also run to the final exit")
    verification: str = Field(
        description="what supports this answer: certified, label-free lower bound, unverified under drift, not certified"
    )
    local_prediction: int | None = Field(None, description="this model's prediction; only on deferred answers")
    fallback_model_version: str | None = Field(None, description="only on deferred answers")


class PredictBatchResponse(BaseModel):
    """The answer to a list of samples (even a list of one)."""

    model_version: str
    results: list[PredictAnswer]


#: a request id as /predict returns it (uuid4, any case)
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class FeedbackRequest(BaseModel):
    """The true label of an answered request."""

    # a field's description completes its error message: '"label" must be <description>, got ...'
    model_config = ConfigDict(strict=True)  # no "3" or 3.0 or true for a label

    request_id: str = Field(
        pattern=UUID_PATTERN, json_schema_extra={"format": "uuid"}, description="the UUID returned by /predict"
    )
    # the upper end is the class count of the model version that answered the request (checked against
    # the logged row; the OpenAPI schema states the served model's)
    label: int = Field(ge=0, description="a non-negative integer class index")


class FeedbackResponse(BaseModel):
    request_id: str
    label: int
    created: bool = Field(description="false when the same label was already recorded")


class HealthResponse(BaseModel):
    status: str
    model_version: str
    delta: float | None
    target_accuracy: float | None
    policy: str
    num_exits: int
    num_classes: int = Field(description="feedback labels are integers in [0, num_classes)")
    device: str = Field("cpu", description="where the model runs (cpu, or cuda:<index> <device name>)")
    input_shape: list[int]
    source: str
    registry_ok: bool
    registry_error: str | None
    logging: bool = Field(description="whether requests are logged to the traffic store")
    uptime_s: float
    answer_mode: str
    answer_threshold: float
    answer_rule_kind: str
    shadow_fraction: float
    fallback_url: str | None
    auth: bool = Field(description="whether writes need the bearer token")
    verification: str = Field(description="the served version's verification status (pcee.verification)")
    labels: str | None = Field(None, description='"waiting for labels (n/150)" while a label-free version waits')
    labels_received: int | None = None
    label_budget: int | None = None


def _nested(shape: tuple[int, ...], item: dict[str, Any]) -> dict[str, Any]:
    for n in reversed(shape):
        item = {"type": "array", "items": item, "minItems": n, "maxItems": n}
    return item


def predict_request_schema(input_shape: tuple[int, ...], max_samples: int) -> dict[str, Any]:
    """JSON schema of ``{"inputs": ...}`` for a model taking ``input_shape`` (C, H, W): one sample, or a
    list of 1..``max_samples`` samples; for one channel a sample may also be (H, W). Pixels in [0, 1]."""
    pixel = {"type": "number", "minimum": 0, "maximum": 1}
    shape = tuple(int(v) for v in input_shape)
    samples = [shape, shape[1:]] if shape[0] == 1 else [shape]
    variants = []
    for s in samples:
        one = _nested(s, pixel)
        variants += [one, {"type": "array", "items": one, "minItems": 1, "maxItems": int(max_samples)}]
    dims = "x".join(map(str, shape))
    return {
        "title": "PredictRequest",
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "inputs": {
                "anyOf": variants,
                "description": f"one sample {list(shape)} (C, H, W; [H, W] for one channel) or a list of at most "
                f"{max_samples} samples; every pixel a number in [0, 1] ({dims} model)",
            }
        },
    }


def feedback_request_schema(num_classes: int) -> dict[str, Any]:
    """JSON schema of ``{"request_id", "label"}`` for a model with ``num_classes`` classes."""
    schema = FeedbackRequest.model_json_schema()
    label = schema["properties"]["label"]
    label["maximum"] = int(num_classes) - 1
    label["description"] = f"the true class of the request, an integer in [0, {int(num_classes) - 1}]"
    return schema

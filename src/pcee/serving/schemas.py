"""Request and response bodies of the HTTP service, as pydantic models (they are its OpenAPI schema).

``/feedback`` requests are validated with :class:`FeedbackRequest`. ``/predict`` inputs are checked
with numpy in :mod:`pcee.serving.inputs` (a pydantic pass over up to 256 images of nested lists
would cost more than the model), so :class:`PredictRequest` only documents them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorResponse(BaseModel):
    """Every refused or failed request."""

    error: str = Field(description="what is wrong and what is accepted")
    status: int = Field(description="the HTTP status code, repeated")


class PredictRequest(BaseModel):
    """JSON body of POST /predict (an image file can be sent instead)."""

    inputs: list[Any] = Field(
        description="one sample, pixels in [0, 1] in the model's input shape [C, H, W] ([H, W] for one channel), "
        "or a list of samples"
    )


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
    local_prediction: int | None = Field(None, description="this model's prediction; only on deferred answers")
    fallback_model_version: str | None = Field(None, description="only on deferred answers")


class PredictBatchResponse(BaseModel):
    """The answer to a list of samples (even a list of one)."""

    model_version: str
    results: list[PredictAnswer]


class FeedbackRequest(BaseModel):
    """The true label of an answered request."""

    # a field's description completes its error message: '"label" must be <description>, got ...'
    model_config = ConfigDict(strict=True)  # no "3" or 3.0 or true for a label

    request_id: str = Field(min_length=1, description="the non-empty string returned by /predict")
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

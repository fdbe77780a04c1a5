"""``params.yaml``, typed: the parameters of the DVC research path and of the pipeline's choice of
operating points. DVC interpolates the file into its stage commands; the flows read it through
:func:`load_params`, so a typo or a bad value fails naming the key, before any training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pcee.calibration.bounds import BOUNDS
from pcee.calibration.ltt import DEFAULT_BOUND, DEFAULT_CALIBRATE_FRACTION, DEFAULT_RISK


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataParams(_Section):
    name: str = "digits"  # source the data/ snapshot is prepared from
    seed: int = 0  # split seed


class TrainParams(_Section):
    model: str = "small-cnn"
    regime: str = "mixed"
    epochs: int = Field(default=10, ge=1)
    seed: int = 0


class OperatingPointParams(_Section):
    """How the pipeline chooses an operating point (``calibrate:``): keyword arguments of
    :func:`pcee.operating_point.choose_operating_point` (:meth:`choice_kwargs`), plus the policy."""

    policy: str = "pcee"
    target_accuracy: float = 0.9  # α
    risk: float = DEFAULT_RISK  # η
    bound: str = DEFAULT_BOUND
    mode: Literal["certified", "point"] = "certified"  # the flows serve an accuracy target, never a budget
    calibrate_fraction: float = DEFAULT_CALIBRATE_FRACTION
    seed: int = 0

    @field_validator("target_accuracy", "risk", "calibrate_fraction")
    @classmethod
    def _in_unit_interval(cls, value: float, info: ValidationInfo) -> float:
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise ValueError(f"{info.field_name} must be in (0, 1), got {value!r}")
        return value

    @field_validator("bound")
    @classmethod
    def _known_bound(cls, value: str) -> str:
        if value not in BOUNDS:
            raise ValueError(f"unknown bound {value!r}; valid: {', '.join(BOUNDS)}")
        return value

    def choice_kwargs(self) -> dict[str, Any]:
        """target_accuracy, risk, bound, mode, calibrate_fraction and seed, for choose_operating_point."""
        return self.model_dump(exclude={"policy"})

    def updated(self, **overrides: Any) -> OperatingPointParams:
        """A validated copy with the ``overrides`` that are not None."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return OperatingPointParams.model_validate({**self.model_dump(), **given})
        except ValidationError as err:
            raise ValueError(_message(err, "operating point")) from None


class SweepParams(_Section):
    policies: str = "pcee pcee-ws threshold"  # space-separated (DVC interpolates strings)


class PipelineParams(_Section):
    data: DataParams = Field(default_factory=DataParams)
    train: TrainParams = Field(default_factory=TrainParams)
    calibrate: OperatingPointParams = Field(default_factory=OperatingPointParams)
    sweep: SweepParams = Field(default_factory=SweepParams)


def load_params(path: str | Path) -> PipelineParams:
    """``path`` (a params.yaml) as :class:`PipelineParams`; ValueError naming the file and the key."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    try:
        return PipelineParams.model_validate(raw)
    except ValidationError as err:
        raise ValueError(_message(err, str(path))) from None


def _message(err: ValidationError, where: str) -> str:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return f"bad {where}: {problems}"

"""The demos' own knobs (``PCEE_DEMO_*``), one model for ``make demo`` and the closed-loop demo;
pcee's settings are :class:`pcee.settings.Settings`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DemoSettings(BaseSettings):
    """``PCEE_DEMO_EPOCHS`` (``make demo``'s training), the closed loop's shift and its patience."""

    model_config = SettingsConfigDict(env_prefix="PCEE_DEMO_", frozen=True, extra="ignore")

    epochs: int = Field(20, ge=1, description="epochs of make demo's train/manual flow run")
    corruption: str = Field("brightness", description="the closed loop's shift (pcee.data.corruptions)")
    # severity 3: the monitor alarms within a few hundred requests, part of the shifted digits traffic still reaches
    # α = 0.9 (oracle coverage above 0.3) and part does not. At severity 5 (the earlier default) no share of it reaches
    # α: the labelled row could only ever say "declined", and whether a run showed that or not depended on training
    # noise (issue 26). The story the closed loop prints is printed either way.
    severity: int = Field(3, ge=1, le=5)
    chunk: int = Field(100, ge=1, description="requests per chunk of shifted traffic")
    loop_timeout_s: float = Field(300.0, gt=0, description="how long the closed loop may take to close")

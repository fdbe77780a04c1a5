"""The evidence model cache the quick smoke tests train into or read from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def evidence_cache() -> Path:
    """``$PCEE_STATE_DIR/evidence/outputs``, where the benchmarks cache their trained models.

    Tests that use it run on one xdist worker (tests/conftest.py: SHARED_FIXTURES), so a run trains
    each quick model once and never twice at the same time; make test's .pcee keeps it between runs."""
    return Path(os.environ["PCEE_STATE_DIR"]) / "evidence" / "outputs"

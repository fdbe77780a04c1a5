"""Fixtures of the policy tests: synthetic multi-exit outputs (:func:`tests.synthetic.make_graded_outputs`)."""

from __future__ import annotations

import pytest

from tests.synthetic import make_graded_outputs


@pytest.fixture
def outputs():
    return make_graded_outputs()


@pytest.fixture(name="make_outputs")
def make_outputs_fixture():
    return make_graded_outputs

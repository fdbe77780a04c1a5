"""Hypothesis properties of the /predict and /feedback input parsers on their own: any JSON value, any
bytes and any number literal give an answer or an InputError with a 4xx status, never another exception."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pcee.serving.app import _validated
from pcee.serving.inputs import InputError, arrays_from_json, parse_json_body
from pcee.serving.schemas import FeedbackRequest

SHAPE = (1, 4, 4)

# JSON values: numbers of every size (ints far beyond int64, floats up to the largest double), nested
pixels = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=0, max_value=1),
)
scalars = st.one_of(st.none(), st.booleans(), pixels, st.text(max_size=5))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=40,
)
# inputs near the accepted shape, so the shape, dtype, finiteness and range checks all run
near_shape = st.one_of(
    st.lists(st.lists(pixels, min_size=4, max_size=4), min_size=4, max_size=4),
    st.lists(st.lists(st.lists(pixels, min_size=4, max_size=4), min_size=4, max_size=4), min_size=1, max_size=3),
)


def _answer_or_4xx(fn, *args):
    try:
        return fn(*args)
    except InputError as err:
        assert 400 <= err.status < 500, err
        return None


def _parse_predict(body: bytes) -> np.ndarray | None:
    payload = _answer_or_4xx(parse_json_body, body)
    if payload is None:
        return None
    out = _answer_or_4xx(arrays_from_json, payload, SHAPE, 3)
    if out is None:
        return None
    x, _ = out
    # what is answered is what the contract promises: finite pixels in [0, 1], the model's shape
    assert x.dtype == np.float32 and x.shape[1:] == SHAPE and 1 <= x.shape[0] <= 3
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    return x


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
def test_any_json_value_is_an_answer_or_a_4xx(value):
    _parse_predict(json.dumps({"inputs": value}).encode())
    _parse_predict(json.dumps(value).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=near_shape)
def test_inputs_near_the_shape_are_an_answer_or_a_4xx(inputs):
    _parse_predict(json.dumps({"inputs": inputs}).encode())


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_any_bytes_are_an_answer_or_a_4xx(body):
    _parse_predict(body)


@settings(max_examples=200, deadline=None)
@given(
    digits=st.text(alphabet="0123456789", min_size=1, max_size=6000),
    sign=st.sampled_from(["", "-"]),
    tail=st.sampled_from(["", ".5", "e400", "e-400", "E+308"]),
)
def test_any_number_literal_is_an_answer_or_a_4xx(digits, sign, tail):
    """Over-long digit strings (past Python's 4300-digit int limit) and numbers beyond float64's range."""
    literal = f"{sign}{digits}{tail}".encode()
    _parse_predict(b'{"inputs": [' + literal + b"]}")
    _parse_predict(b'{"inputs": [[' + b", ".join([literal] * 4) + b"]]}")
    _feedback(b'{"request_id": "00000000-0000-4000-8000-000000000000", "label": ' + literal + b"}")


def _feedback(body: bytes) -> BaseModel | None:
    payload = _answer_or_4xx(parse_json_body, body)
    if payload is None:
        return None
    fb = _answer_or_4xx(_validated, FeedbackRequest, payload, "not an object")
    assert fb is None or (isinstance(fb.label, int) and fb.label >= 0)
    return fb


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values, label=json_values)
def test_any_feedback_body_is_a_request_or_a_4xx(value, label):
    _feedback(json.dumps(value).encode())
    _feedback(json.dumps({"request_id": "00000000-0000-4000-8000-000000000000", "label": label}).encode())


@pytest.mark.parametrize(
    "literal",
    [b"1" * 5000, b"-" + b"9" * 4301, b"373428038193593712640", b"1e400", b"-1e400", b"1" + b"0" * 400 + b".5"],
)
def test_the_issue_numbers_are_4xx(literal):
    """The literals that gave 500s (issue 30): a 5000-digit int in the inputs, a 21-digit label."""
    with pytest.raises(InputError) as err:
        arrays_from_json(parse_json_body(b'{"inputs": [[' + b", ".join([literal] * 4) + b"]] }"), (1, 1, 4), 3)
    assert 400 <= err.value.status < 500
    with pytest.raises(InputError) as err:
        _validated(
            FeedbackRequest,
            parse_json_body(b'{"request_id": "00000000-0000-4000-8000-000000000000", "label": ' + literal + b"}"),
            "not an object",
        )
    assert err.value.status == 422

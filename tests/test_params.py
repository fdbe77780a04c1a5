"""params.yaml, typed (pcee.params): the checkout's file loads, and a bad one fails naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcee.params import OperatingPointParams, load_params

REPO = Path(__file__).resolve().parents[1]


def test_the_checkouts_params_load_and_feed_the_choice():
    params = load_params(REPO / "params.yaml")
    kwargs = params.calibrate.choice_kwargs()
    assert set(kwargs) == {"target_accuracy", "risk", "bound", "mode", "calibrate_fraction", "seed"}
    assert 0 < kwargs["target_accuracy"] < 1 and params.calibrate.policy == "pcee"
    assert params.sweep.policies.split()[0] == "pcee"


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("calibrate:\n  risk: 1.5\n", "calibrate.risk"),
        ("calibrate:\n  bound: chebyshev\n", "unknown bound 'chebyshev'"),
        ("calibrate:\n  mode: budget\n", "calibrate.mode"),
        ("calibrate:\n  targt_accuracy: 0.9\n", "calibrate.targt_accuracy"),  # a typo is not silently ignored
        ("train:\n  epochs: 0\n", "train.epochs"),
        ("calibrate: [\n", "cannot read"),
    ],
)
def test_a_bad_file_names_the_key(tmp_path, yaml_text, needle):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError) as err:
        load_params(path)
    assert needle in str(err.value) and (str(path) in str(err.value))


def test_overrides_replace_only_what_is_given_and_are_checked():
    base = OperatingPointParams()
    assert base.updated(risk=0.05, bound=None).risk == 0.05 and base.updated(risk=0.05).bound == base.bound
    with pytest.raises(ValueError, match="target_accuracy"):
        base.updated(target_accuracy=1.0)

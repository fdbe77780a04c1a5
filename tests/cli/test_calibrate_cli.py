"""`pcee calibrate --target` and `pcee sweep --target`: operating points chosen on validation only.

Real code on a synthetic outputs-contract directory (no mocks): relabelling or removing test.npz
cannot change the chosen point; an uncertifiable target exits 2 naming the best certifiable
accuracy and the calibrate rows; bad α / η are clear errors.
"""

from __future__ import annotations

import json
import shutil

import pytest

from pcee.cli import main
from pcee.cli.calibrate import operating_point_path
from pcee.operating_point import CHECK_LABEL
from pcee.outputs import write_outputs_dir
from pcee.policies.registry import policy_from_dict
from tests.cli.outputs_helpers import relabelled_copy, synthetic

TEST_KEYS = {"test_accuracy", "test_relative_cost", "n_test"}


@pytest.fixture(scope="module")
def outputs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs") / "run"
    write_outputs_dir(d, {"val": synthetic(800, 0), "test": synthetic(800, 1)}, {"dataset": "synthetic"})
    return d


@pytest.fixture(scope="module")
def relabelled_dir(outputs_dir, tmp_path_factory):
    return relabelled_copy(outputs_dir, tmp_path_factory.mktemp("relabelled") / "run")


def calibrate(outputs, out, *extra) -> int:
    return main(
        ["calibrate", "--outputs", str(outputs), "--policy", "pcee", "--target", "0.8", "--out", str(out), *extra]
    )


def test_operating_point_path():
    assert operating_point_path("runs/x-pcee.json").as_posix() == "runs/x-pcee.operating_point.json"
    assert operating_point_path("runs/policy").as_posix() == "runs/policy.operating_point.json"


@pytest.mark.parametrize("policy", ["pcee", "pcee-ws", "threshold", "risk-controlled"])
def test_calibrate_target_ignores_test_labels(outputs_dir, relabelled_dir, tmp_path, capsys, policy):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    argv = ["calibrate", "--policy", policy, "--target", "0.8", "--risk", "0.1", "--bound", "clopper-pearson"]
    assert main([*argv, "--outputs", str(outputs_dir), "--out", str(a)]) == 0
    printed = capsys.readouterr().out
    assert main([*argv, "--outputs", str(relabelled_dir), "--out", str(b)]) == 0
    # the served policy is byte-identical whatever the test labels are
    assert a.read_bytes() == b.read_bytes()
    op_a, op_b = (json.loads(operating_point_path(p).read_text()) for p in (a, b))
    assert {k: v for k, v in op_a.items() if k not in TEST_KEYS} == {
        k: v for k, v in op_b.items() if k not in TEST_KEYS
    }
    # ...while the check did read the test labels
    assert op_a["test_accuracy"] != op_b["test_accuracy"]
    assert op_a["certified"] is True and op_a["accuracy_lower_bound"] >= 0.8 and op_a["n_calibrate"] == 400
    assert op_a["test_accuracy_label"] == CHECK_LABEL and op_a["chosen_on"].startswith("validation")
    assert f"{CHECK_LABEL}:" in printed and "certified | yes" in printed
    served = policy_from_dict(json.loads(a.read_text()))
    assert served.name == policy and served.is_fitted
    if op_a["param_name"]:
        assert served.get_params()[op_a["param_name"]] == pytest.approx(op_a["value"])


def test_calibrate_target_never_reads_test(outputs_dir, tmp_path, capsys):
    with_test = tmp_path / "with.json"
    assert calibrate(outputs_dir, with_test) == 0
    capsys.readouterr()
    no_test = tmp_path / "outputs"
    no_test.mkdir()
    shutil.copy(outputs_dir / "val.npz", no_test / "val.npz")
    out = tmp_path / "without.json"
    assert calibrate(no_test, out) == 0
    printed = capsys.readouterr().out
    assert out.read_bytes() == with_test.read_bytes()
    op = json.loads(operating_point_path(out).read_text())
    assert op["test_accuracy"] is None and f"{CHECK_LABEL}:" not in printed


def test_calibrate_point_and_budget_modes(outputs_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert calibrate(outputs_dir, out, "--mode", "point") == 0
    op = json.loads(operating_point_path(out).read_text())
    assert op["mode"] == "point" and op["certified"] is False and op["calibrate_accuracy"] >= 0.8
    assert "no guarantee" in capsys.readouterr().out
    out = tmp_path / "b.json"
    assert (
        main(
            ["calibrate", "--outputs", str(outputs_dir), "--policy", "threshold", "--budget", "0.6", "--out", str(out)]
        )
        == 0
    )
    op = json.loads(operating_point_path(out).read_text())
    assert op["mode"] == "budget" and op["certified"] is True and op["relative_cost"] <= 0.6


def test_calibrate_uncertifiable_target(outputs_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert calibrate(outputs_dir, out, "--target", "0.99") == 2  # the later --target wins
    err = capsys.readouterr().err
    assert "best certifiable accuracy is 0.9" in err and "400 calibrate rows" in err
    assert not out.exists() and not operating_point_path(out).exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--target", "1.5"], "--target must be in (0, 1), got 1.5"),
        (["--target", "0"], "--target must be in (0, 1)"),
        (["--risk", "0"], "--risk must be in (0, 1), got 0.0"),
        (["--risk", "1.2"], "--risk must be in (0, 1)"),
        (["--risk", "nan"], "--risk must be in (0, 1)"),
        (["--calibrate-fraction", "1"], "--calibrate-fraction must be in (0, 1)"),
        (["--delta", "0.9"], "not both"),
        (["--mode", "budget"], "--mode budget needs --budget"),
    ],
)
def test_calibrate_bad_choice_input(outputs_dir, tmp_path, capsys, extra, message):
    assert calibrate(outputs_dir, tmp_path / "p.json", *extra) == 2
    assert message in capsys.readouterr().err


def test_calibrate_choice_flags_need_a_target(outputs_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert (
        main(["calibrate", "--outputs", str(outputs_dir), "--policy", "pcee", "--risk", "0.05", "--out", str(out)]) == 2
    )
    assert "--risk only apply with --target or --budget" in capsys.readouterr().err
    assert (
        main(["calibrate", "--outputs", str(outputs_dir), "--policy", "oracle", "--target", "0.8", "--out", str(out)])
        == 2
    )
    assert "decides with labels" in capsys.readouterr().err


def test_calibrate_manual_delta_says_no_guarantee(outputs_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert (
        main(["calibrate", "--outputs", str(outputs_dir), "--policy", "pcee", "--delta", "0.9", "--out", str(out)]) == 0
    )
    assert "manual point without guarantee" in capsys.readouterr().out
    assert not operating_point_path(out).exists()


def test_sweep_target_operating_points(outputs_dir, relabelled_dir, tmp_path, capsys):
    argv = [
        "sweep",
        "--policy",
        "pcee,threshold,oracle,risk-controlled",
        "--deltas",
        "0:1:0.01",
        "--target",
        "0.8",
        "--risk",
        "0.1",
    ]
    assert main([*argv, "--outputs", str(outputs_dir), "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "Sweep evaluated on test, for reporting" in printed
    assert "Operating points (chosen on validation only)" in printed and CHECK_LABEL in printed
    assert main([*argv, "--outputs", str(relabelled_dir), "--out", str(tmp_path / "b")]) == 0
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text())["operating_points"] for d in ("a", "b"))
    assert ma["test_accuracy_label"] == CHECK_LABEL
    assert set(ma["policies"]) == {"pcee", "threshold", "risk-controlled"}  # the oracle has no operating point
    for name, op in ma["policies"].items():
        assert {k: v for k, v in op.items() if k not in TEST_KEYS} == {
            k: v for k, v in mb["policies"][name].items() if k not in TEST_KEYS
        }
        assert op["test_accuracy"] != mb["policies"][name]["test_accuracy"]
        assert op["certified"] and op["accuracy_lower_bound"] >= 0.8 and op["n_calibrate"] == 400


def test_sweep_target_bad_input(outputs_dir, tmp_path, capsys):
    base = ["sweep", "--outputs", str(outputs_dir), "--policy", "pcee", "--out", str(tmp_path / "x")]
    assert main([*base, "--target", "1.0"]) == 2
    assert "--target must be in (0, 1)" in capsys.readouterr().err
    assert main([*base, "--target", "0.8", "--risk", "-0.1"]) == 2
    assert "--risk must be in (0, 1)" in capsys.readouterr().err
    assert main([*base, "--risk", "0.1"]) == 2
    assert "only apply with --target" in capsys.readouterr().err

"""`pcee sweep` and `pcee calibrate` end to end on a synthetic outputs-contract directory."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pcee.cli import main
from pcee.outputs import ExitOutputs, write_outputs_dir
from pcee.policies.registry import POLICY_NAMES, policy_from_dict
from tests.cli.outputs_helpers import synthetic


@pytest.fixture(scope="module")
def outputs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs") / "run"
    write_outputs_dir(d, {"val": synthetic(800, 0), "test": synthetic(800, 1)}, {"dataset": "synthetic"})
    return d


def test_sweep_all(outputs_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert (
        main(["sweep", "--outputs", str(outputs_dir), "--policy", "all", "--deltas", "0:1:0.01", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "pcee-ws" in printed and "area gap" in printed
    df = pd.read_csv(out / "sweep.csv")
    assert {"policy", "delta", "accuracy", "mean_flops", "relative_cost", "shortfall"} <= set(df.columns)
    assert set(df["policy"]) == set(POLICY_NAMES)
    assert (df[df.policy == "pcee"]["delta"].round(6) == np.round(np.arange(101) * 0.01, 6)).all()
    assert df[df.policy == "pcee"]["shortfall"].notna().all() and df[df.policy == "eero"]["shortfall"].isna().all()
    for png in (
        "reliability.png",
        "reliability_pcee-ws.png",
        "accuracy_vs_cost.png",
        "achieved_vs_delta.png",
        "exit_histogram.png",
    ):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_exit_test"]) == 3
    assert {"accuracy", "ece", "auroc", "aurc"} <= set(metrics["per_exit_test"][0])
    assert metrics["policies"]["pcee-ws"]["shortfall_achievable"]["n"] > 0
    assert metrics["policies"]["oracle"]["area_gap_to_oracle"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["policies"]["threshold"]["area_gap_to_oracle"] > 0


def test_sweep_single_policy_options(outputs_dir, tmp_path):
    out = tmp_path / "one"
    rc = main(
        [
            "sweep",
            "--outputs",
            str(outputs_dir),
            "--policy",
            "pcee",
            "--score",
            "entropy",
            "--bins",
            "10",
            "--min-count",
            "5",
            "--deltas",
            "0.5,0.7,0.9",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    df = pd.read_csv(out / "sweep.csv")
    assert list(df["delta"]) == [0.5, 0.7, 0.9] and set(df["policy"]) == {"pcee"}
    assert (out / "accuracy_vs_cost.png").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--policy", "nope"], "unknown policy"),
        (["--policy", "pcee", "--score", "bogus"], "unknown confidence score"),
        (["--policy", "pcee", "--deltas", "0:1:-1"], "--deltas"),
        (["--policy", "pcee", "--deltas", "0,2"], "[0, 1]"),
    ],
)
def test_sweep_bad_input(outputs_dir, tmp_path, capsys, argv, message):
    assert main(["sweep", "--outputs", str(outputs_dir), *argv, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_sweep_missing_outputs(tmp_path, capsys):
    assert main(["sweep", "--outputs", str(tmp_path / "none"), "--policy", "pcee", "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_calibrate(outputs_dir, tmp_path, capsys):
    out = tmp_path / "policy.json"
    assert (
        main(["calibrate", "--outputs", str(outputs_dir), "--policy", "pcee-ws", "--delta", "0.85", "--out", str(out)])
        == 0
    )
    d = json.loads(out.read_text())
    policy = policy_from_dict(d)
    assert policy.name == "pcee-ws" and policy.delta == 0.85 and policy.is_fitted
    val = ExitOutputs.load(outputs_dir / "val.npz")
    assert policy.decide(val.logits).shape == (len(val),)
    assert (
        main(["calibrate", "--outputs", str(outputs_dir), "--policy", "threshold", "--bins", "5", "--out", str(out)])
        == 2
    )
    assert "no parameter 'n_bins'" in capsys.readouterr().err
    assert main(["calibrate", "--outputs", str(tmp_path / "none"), "--policy", "pcee", "--out", str(out)]) == 2

"""The DVC calibrate and sweep stages choose operating points on validation only.

Real code (``python -m pcee.dvc_stages``) on synthetic outputs-contract directories: relabelling
test.npz cannot change the chosen δ, the policy JSON or the certificate; test figures appear only
under ``*_check`` keys. The commands in dvc.yaml, interpolated from params.yaml, parse and run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcee.dvc_stages import main
from pcee.outputs import write_outputs_dir
from tests.cli.outputs_helpers import relabelled_copy, synthetic

REPO = Path(__file__).resolve().parents[2]


def _without_checks(d: dict) -> dict:
    return {
        k: (_without_checks(v) if isinstance(v, dict) else v)
        for k, v in d.items()
        if not k.endswith("_check") and k != "max_shortfall_test_curve"
    }


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvc-op")
    original = root / "original"
    write_outputs_dir(original, {"val": synthetic(800, 0), "test": synthetic(800, 1)}, {"dataset": "synthetic"})
    return original, relabelled_copy(original, root / "relabelled")


def stage_command(stage: str) -> list[str]:
    """dvc.yaml's command for ``stage`` with params.yaml interpolated, as argv after ``-m pcee.dvc_stages``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"]

    def value(m: re.Match) -> str:
        v = params
        for part in m.group(1).split("."):
            v = v[part]
        return str(v)

    argv = shlex.split(re.sub(r"\$\{([^}]+)\}", value, cmd))
    assert argv[:3] == ["python", "-m", "pcee.dvc_stages"] and argv[3] == stage
    return argv[3:]


def with_paths(argv: list[str], **paths: Path) -> list[str]:
    argv = list(argv)
    for flag, path in paths.items():
        argv[argv.index(f"--{flag.replace('_', '-')}") + 1] = str(path)
    return argv


def test_dvc_yaml_declares_what_the_stages_read():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())["calibrate"]
    assert {"target_accuracy", "risk", "bound", "mode", "calibrate_fraction", "seed"} <= set(params)
    assert params["mode"] == "certified" and params["bound"] == "clopper-pearson"
    for name in ("calibrate", "sweep"):
        assert "src/pcee/operating_point.py" in stages[name]["deps"]
    assert {
        f"calibrate.{k}" for k in ("target_accuracy", "risk", "bound", "mode", "calibrate_fraction", "seed")
    } <= set(stages["sweep"]["params"])


def test_calibrate_stage_ignores_test_labels(dirs, tmp_path, capsys):
    argv = stage_command("calibrate")
    got = {}
    for d in dirs:
        out, metrics = tmp_path / d.name / "calibrate", tmp_path / d.name / "calibrate.json"
        # the demo target (0.9) is beyond these synthetic outputs: choose at 0.8, everything else from params.yaml
        run = with_paths(argv, outputs=d, out=out, metrics=metrics)
        run[run.index("--target") + 1] = "0.8"
        assert main(run) == 0, capsys.readouterr().err
        got[d.name] = (
            json.loads(metrics.read_text()),
            (out / "policy.json").read_bytes(),
            json.loads((out / "operating_point.json").read_text()),
        )
    (ma, pa, oa), (mb, pb, ob) = got["original"], got["relabelled"]
    assert pa == pb  # the served policy
    assert ma["delta"] == mb["delta"] and _without_checks(ma) == _without_checks(mb)
    assert {k: v for k, v in oa.items() if not k.startswith("test_") and k != "n_test"} == {
        k: v for k, v in ob.items() if not k.startswith("test_") and k != "n_test"
    }
    assert ma["test_accuracy_check"] != mb["test_accuracy_check"]  # the check did read the labels
    assert ma["certified"] is True and ma["accuracy_lower_bound"] >= 0.8 and ma["n_calibrate"] == 400
    assert ma["risk"] == 0.1 and ma["bound"] == "clopper-pearson" and ma["mode"] == "certified"
    assert "test_accuracy" not in ma and "exit1_accuracy" in ma


def test_sweep_stage_ignores_test_labels(dirs, tmp_path, capsys):
    argv = stage_command("sweep")
    got = {}
    for d in dirs:
        cal = tmp_path / d.name / "calibrate"
        assert (
            main(
                [
                    "calibrate",
                    "--outputs",
                    str(d),
                    "--target",
                    "0.8",
                    "--out",
                    str(cal),
                    "--metrics",
                    str(tmp_path / d.name / "c.json"),
                ]
            )
            == 0
        )
        metrics = tmp_path / d.name / "sweep.json"
        run = with_paths(
            argv, outputs=d, policy_json=cal / "policy.json", out=tmp_path / d.name / "sweep", metrics=metrics
        )
        run[run.index("--target") + 1] = "0.8"
        assert main(run) == 0, capsys.readouterr().err
        got[d.name] = json.loads(metrics.read_text())
    a, b = got["original"], got["relabelled"]
    policies = yaml.safe_load((REPO / "params.yaml").read_text())["sweep"]["policies"].split()
    assert set(a) == {"settings", *policies}
    assert _without_checks(a) == _without_checks(b)
    for name in policies:
        assert a[name]["delta"] == b[name]["delta"]
        assert a[name]["test_accuracy_check"] != b[name]["test_accuracy_check"]
        assert a[name]["certified"] is True and a[name]["accuracy_lower_bound"] >= 0.8
    assert a["settings"]["chosen_on"].startswith("validation")
    assert (tmp_path / "original" / "sweep" / "sweep.csv").is_file()


def test_calibrate_stage_as_a_module(dirs, tmp_path):
    """`python -m pcee.dvc_stages calibrate`: a target beyond the calibrate rows exits 2 with the best certifiable accuracy."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    base = [
        sys.executable,
        "-m",
        "pcee.dvc_stages",
        "calibrate",
        "--outputs",
        str(dirs[0]),
        "--out",
        str(tmp_path / "c"),
        "--metrics",
        str(tmp_path / "c.json"),
    ]
    proc = subprocess.run([*base, "--target", "0.99"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "best certifiable accuracy is 0.9" in proc.stderr and "400 calibrate rows" in proc.stderr
    assert not (tmp_path / "c.json").exists()
    proc = subprocess.run(
        [*base, "--target", "0.8", "--risk", "1.5"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2 and "risk must be in (0, 1)" in proc.stderr

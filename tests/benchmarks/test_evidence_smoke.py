"""Smoke test of the evidence experiments: one experiment end to end at --quick scale on digits."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EVIDENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "evidence"


def _load(name: str):
    sys.path.insert(0, str(EVIDENCE))
    spec = importlib.util.spec_from_file_location(f"evidence_{name}", EVIDENCE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_control_quick_writes_section_and_report(tmp_path):
    import torch

    torch.set_num_threads(1)
    report = tmp_path / "reports"
    control = _load("control")
    assert control.main(["--quick", "--no-mlflow", "--report-dir", str(report)]) == 0

    md = (report / "evidence" / "control.md").read_text()
    assert md.startswith("## 2. Performance control")
    assert "Scale: **quick**" in md
    assert "| pcee | delta |" in md and "| risk-controlled | alpha |" in md
    data = json.loads((report / "evidence" / "control.json").read_text())
    policies = data["results"]["policies"]
    assert set(policies) == {"pcee", "pcee-ws", "threshold", "temperature", "risk-controlled"}
    for name, row in policies.items():
        assert row["all"]["n"] > 0, name
        assert 0.0 <= row["all"]["mean"] <= row["all"]["max"] <= 1.0, name
    assert 0.5 < data["results"]["final_exit_test_accuracy"] <= 1.0  # digits small-cnn learns in 3 epochs
    for fig in ("control_achieved_vs_delta.png", "control_accuracy_vs_cost.png"):
        png = report / "figures" / fig
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{fig}" in md

    # the joined report carries the section and says plainly which experiments have not run
    run_all = _load("run_all")
    out = run_all.assemble(report, {}, [], {"when": "now", "commit": "test", "command": "test", "total_seconds": None})
    text = out.read_text()
    assert "## 2. Performance control" in text
    assert text.count("Not run at any scale yet") == len(run_all.EXPERIMENTS) - 1


def test_bad_flag_is_refused(tmp_path):
    control = _load("control")
    with pytest.raises(SystemExit):
        control.main(["--quick", "--no-such-flag"])

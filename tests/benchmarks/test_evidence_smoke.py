"""Smoke test of the evidence experiments: one experiment end to end at --quick scale on digits."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.bench_scripts import BENCHMARKS, load_script

EVIDENCE = BENCHMARKS / "evidence"


def _load(name: str):
    return load_script(EVIDENCE / f"{name}.py", f"evidence_{name}")


@pytest.mark.usefixtures("evidence_cache")  # trains the quick model into the shared cache, or reads it
@pytest.mark.timeout(120)
def test_control_quick_writes_section_and_report(tmp_path):
    import torch

    torch.set_num_threads(1)
    report = tmp_path / "reports"
    control = _load("control")
    assert control.main(["--quick", "--no-mlflow", "--report-dir", str(report)]) == 0

    md = (report / "evidence" / "control.md").read_text()
    assert md.startswith("## 2. Performance control")
    assert "| pcee | delta |" in md and "| risk-controlled | alpha |" in md  # a table row per policy
    data = json.loads((report / "evidence" / "control.json").read_text())
    assert data["scale"]["scale"] == "quick"
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


@pytest.mark.timeout(300)
def test_run_all_runs_the_msdnet_variant_and_logs_to_mlflow_under_the_state_dir(tmp_path, monkeypatch):
    """make bench's MSDNet pair of experiment 1 is its own section; its MLflow artifacts stay under the state dir."""
    state = tmp_path / "state"
    monkeypatch.setenv("PCEE_STATE_DIR", str(state))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report = tmp_path / "reports"
    run_all = _load("run_all")
    rc = run_all.main(
        ["--quick", "--only", "equal_cost_msdnet", "--skip-others", "--report-dir", str(report), "--threads", "1"]
    )
    assert rc == 0

    md = (report / "evidence" / "equal_cost_msdnet.md").read_text()
    assert md.startswith("## 1. Bigger model + PCEE vs smaller full model at equal cost (msdnet)")
    data = json.loads((report / "evidence" / "equal_cost_msdnet.json").read_text())
    assert (data["scale"]["model"], data["scale"]["preset"]) == ("msdnet", "cifar10-anytime")
    res = data["results"]
    assert len(res["large_flops"]) == len(res["small_flops"]) == 7  # the CIFAR anytime MSDNet has 7 exits
    assert res["small_flops"][-1] < res["large_flops"][-1]
    assert res["pcee"]["test_mean_flops"] <= 1.1 * res["budget_flops"]
    text = (report / "evidence.md").read_text()
    assert "(msdnet)" in text and "| quick+overrides | ok |" in text

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{state / 'evidence' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("evidence")
    assert experiment.artifact_location.startswith((state / "evidence" / "artifacts").resolve().as_uri())
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["equal_cost_msdnet"]
    assert any((state / "evidence" / "artifacts").rglob("equal_cost_msdnet.md"))

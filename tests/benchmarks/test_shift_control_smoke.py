"""Smoke test of benchmarks/shift_control.py: --quick on digits (a 3-epoch model trained here, ~30 s)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.benchmarks.bench_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "shift_control.py"


def _load():
    return load_script(SCRIPT, "shift_control")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.usefixtures("evidence_cache")  # trains the quick model into the shared cache, or reads it
@pytest.mark.timeout(150)
def test_quick_writes_table_goals_json_and_figure(tmp_path, capsys):
    sc = _load()
    assert sc.main(["--quick", "--report-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out

    md = (tmp_path / "shift_control.md").read_text()
    assert md.strip() in printed  # what is printed is the report
    assert (
        "uv run --locked python benchmarks/shift_control.py --quick" in md.splitlines()[2]
    )  # the command that reproduces it
    conditions = sc.condition_names(sc.QUICK_SEVERITIES, sc.QUICK_JPEG)
    assert conditions[0] == "clean" and conditions[-1] == "class_prior" and "jpeg/10" in conditions
    for cond in conditions:
        assert f"\n| {cond} |" in md, cond
    assert "## Goals" in md and "## Leave one family out" in md
    for goal in ("label-free accuracy on answered >= α − 1 point", "certified coverage with <= 150 labels"):
        lines = [line for line in md.splitlines() if goal in line]
        assert lines and all(line.startswith(("- PASS", "- FAIL")) for line in lines), goal
    png = tmp_path / "figures" / "shift_control.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((tmp_path / "shift_control.json").read_text())
    assert data["scale"] == "quick" and data["severities"] == list(sc.QUICK_SEVERITIES)
    (res,) = data["datasets"]
    assert res["name"] == "digits" and 0.0 < res["alpha"] < 1.0
    assert res["condition_order"] == conditions and set(res["conditions"]) == set(conditions)  # the JSON sorts its keys
    assert set(data["goals"]) == {"answered_digits", "few_labels"}
    assert res["margin"]["all_families"] >= max(res["margin"]["per_family"].values())
    for cond, c in res["conditions"].items():
        lf, fl = c["label_free"], c["few_labels"]
        assert 0.0 <= lf["coverage"] <= 1.0 and lf["unverified_share"] == pytest.approx(1.0 - lf["coverage"]), cond
        assert lf["answered_accuracy"] is None if lf["n_answered"] == 0 else 0.0 <= lf["answered_accuracy"] <= 1.0
        assert 0.0 <= fl["oracle"] <= 1.0 and 0.0 <= fl["envelope"] <= 1.0, cond
        assert set(fl["curve"]) == {str(b) for b in sc.BUDGETS}
        for point in fl["curve"].values():
            assert 0.0 <= point["coverage"] <= 1.0 and 0 < point["labels"] <= 500, cond
        assert _finite(c["final_accuracy"]) and _finite(c["floor"]) and _finite(c["atc"]["abs_error"]), cond
        assert c["floor"] == pytest.approx(max(0.0, res["alpha"] - c["final_accuracy"]), abs=0.02)
        d = c["detection"]
        assert d["delay"] is None or (d["delay"] > 0 and d["delay"] % sc.CHUNK == 0 and d["delay"] <= d["streamed"]), (
            cond
        )
    prior = res["conditions"]["class_prior"]
    assert len(prior["prior_classes"]) == sc.PRIOR_CLASSES and prior["prior_share"] > 0.5


def test_oracle_coverage_answers_ties_together():
    sc = _load()
    scores = np.array([0.9, 0.9, 0.8, 0.7, 0.7, 0.1])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    assert sc.oracle_coverage(scores, correct, 0.75) == pytest.approx(5 / 6)  # 4/5 right with the 0.7 tie
    assert sc.oracle_coverage(scores, correct, 0.99) == pytest.approx(3 / 6)
    assert sc.oracle_coverage(scores, ~correct, 0.5) == 0.0


def test_bad_dataset_flag_is_refused():
    sc = _load()
    with pytest.raises(SystemExit):
        sc.main(["--datasets", "mnist"])

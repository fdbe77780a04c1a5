"""Smoke test of benchmarks/shift_control.py: --quick on digits (a 3-epoch model trained here, ~20 s)."""

from __future__ import annotations

import json
import math

import pytest

from tests.benchmarks.bench_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "shift_control.py"


def _load():
    return load_script(SCRIPT, "shift_control")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.usefixtures("evidence_cache")  # trains the quick model into the shared cache, or reads it
@pytest.mark.timeout(90)
def test_quick_writes_table_goals_json_and_figure(tmp_path, capsys):
    sc = _load()
    assert sc.main(["--quick", "--report-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out

    md = (tmp_path / "shift_control.md").read_text()
    assert md.strip() in printed  # what is printed is the report
    assert (
        "uv run --locked python benchmarks/shift_control.py --quick" in md.splitlines()[2]
    )  # the command that reproduces it
    conditions = sc.condition_names(sc.QUICK_SEVERITIES)
    assert conditions[0] == "clean" and conditions[-1] == "class_prior" and len(conditions) == 7
    for cond in conditions:
        assert f"\n| {cond} |" in md, cond
    assert "## Goals" in md
    for goal in (
        "accuracy on answered >= α − 1 point",
        "label-free (0 labels) removes",
        "clean coverage >= 0.98",
        "mean |ATC error| of the final exit",
    ):
        lines = [line for line in md.splitlines() if goal in line]
        assert lines and all(line.startswith(("- PASS", "- FAIL")) for line in lines), goal
    png = tmp_path / "figures" / "shift_control.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((tmp_path / "shift_control.json").read_text())
    assert data["scale"] == "quick" and data["severities"] == list(sc.QUICK_SEVERITIES)
    (res,) = data["datasets"]
    assert res["name"] == "digits" and 0.0 < res["alpha"] < 1.0
    assert res["condition_order"] == conditions and set(res["conditions"]) == set(conditions)  # the JSON sorts its keys
    assert set(data["goals"]["digits"]) == {
        "answered_accuracy_label_free",
        "answered_accuracy_labelled",
        "label_free_halves_gap",
        "clean_coverage",
        "atc_error",
    }
    for cond, c in res["conditions"].items():
        assert _finite(c["final_accuracy"]) and _finite(c["floor"]) and _finite(c["atc_error_final"]), cond
        assert all(_finite(e) and e >= 0 for e in c["atc_abs_error"]), cond
        assert len(c["atc_abs_error"]) == len(res["val_accuracy"])
        for version in sc.VERSIONS:
            v = c[version]
            assert _finite(v["shortfall"]) and 0.0 <= v["shortfall"] <= res["alpha"], (cond, version)
            assert _finite(v["coverage"]) and 0.0 <= v["coverage"] <= 1.0, (cond, version)
            assert 0.0 <= v["accuracy"] <= 1.0 and 0.0 < v["relative_cost"] <= 1.0 + 1e-9, (cond, version)
            assert v["answered_accuracy"] is None if v["n_answered"] == 0 else 0.0 <= v["answered_accuracy"] <= 1.0
        assert c["floor"] == pytest.approx(max(0.0, res["alpha"] - c["final_accuracy"]), abs=0.02)
        d = c["detection"]
        assert d["delay"] is None or (d["delay"] > 0 and d["delay"] % sc.CHUNK == 0 and d["delay"] <= d["streamed"]), (
            cond
        )
    prior = res["conditions"]["class_prior"]
    assert len(prior["prior_classes"]) == sc.PRIOR_CLASSES and prior["prior_share_measured"] > 0.5


def test_bad_dataset_flag_is_refused():
    sc = _load()
    with pytest.raises(SystemExit):
        sc.main(["--datasets", "mnist"])

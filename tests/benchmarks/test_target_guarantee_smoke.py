"""Smoke test of benchmarks/target_guarantee.py: --quick on synthetic outputs (no training)."""

from __future__ import annotations

import json
import math

import pytest

from tests.benchmarks.bench_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "target_guarantee.py"


def _load():
    return load_script(SCRIPT, "target_guarantee")


@pytest.mark.timeout(60)
def test_quick_synthetic_table_has_every_method(tmp_path, capsys):
    tg = _load()
    assert tg.main(["--quick", "--synthetic", "--draws", "2", "--report-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out

    md = (tmp_path / "target_guarantee.md").read_text()
    assert md.strip() in printed  # what is printed is the report
    for method in tg.METHODS:
        assert f"| {method} |" in md, method
    assert "## Verdicts" in md and "Recommended default bound" in md

    data = json.loads((tmp_path / "target_guarantee.json").read_text())
    assert data["recommended_bound"] in tg.BOUNDS
    (res,) = data["datasets"]
    assert res["draws"] == 2 and len(res["targets"]) == len(tg.OFFSETS)
    assert res["sizes"]["fit"] + res["sizes"]["calibrate"] + res["sizes"]["evaluate"] == res["n_pool"]
    cells = res["cells"]
    assert {c["method"] for c in cells} == set(tg.METHODS)
    assert len(cells) == len(tg.METHODS) * len(tg.OFFSETS)
    for c in cells:
        if c["method"].startswith("certified/"):
            rate = c["miss_rate"]
            assert isinstance(rate, float) and not math.isnan(rate) and 0.0 <= rate <= 1.0, c
            assert 0 <= c["not_met_below"] <= c["not_met"] <= c["draws"]
        assert 0.0 < c["median_cost"] <= 1.0 + 1e-9
    # every record evaluated rows the choice never saw: fit + calibrate + evaluate = the pool
    assert all(r["n_eval"] in (res["sizes"]["evaluate"], res["sizes"]["old_evaluate"]) for r in res["records"])


def test_bad_data_flag_is_refused():
    tg = _load()
    with pytest.raises(SystemExit):
        tg.main(["--data", "mnist"])

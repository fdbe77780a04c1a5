"""The one-paragraph MLflow description every registering flow gives a new version (flows/_common.py)."""

from __future__ import annotations

from flows._common import version_description


def test_certified_version_description_names_data_operating_point_and_gate():
    tags = {
        "data_md5": "0123abcd.dir",
        "policy": "pcee",
        "delta": "0.93",
        "target_accuracy": "0.9",
        "risk": "0.1",
        "bound": "clopper-pearson",
        "mode": "certified",
        "certified": "true",
        "n_calibrate": "180",
        "accuracy_lower_bound": "0.912",
        "answer_threshold": "0.4",
        "answer_rule_kind": "certified",
    }
    before = version_description("small-cnn trained on digits, regime mixed, 5 epochs", tags)
    text = version_description(
        "small-cnn trained on digits, regime mixed, 5 epochs", tags, {"promote": True, "reason": "meets  the\ntarget"}
    )
    assert "\n" not in text and text.startswith(
        "small-cnn trained on digits, regime mixed, 5 epochs. Data version (md5) 0123abcd.dir."
    )
    for part in (
        "policy pcee",
        "δ=0.93",
        "α=0.9",
        "η=0.1",
        "bound clopper-pearson",
        "certified (accuracy lower bound 0.912 on 180 calibrate rows)",
        "ρ=0.4 (certified)",
        "Gate: promoted (meets the target).",
    ):
        assert part in text, part
    assert before.endswith("Gate: not evaluated yet.") and "not certified" not in text


def test_label_free_version_description_says_not_certified():
    tags = {"policy": "pcee", "delta": "0.3", "target_accuracy": "0.3", "mode": "label_free", "certified": "false"}
    text = version_description("recalibrated from v1 (label-free)", tags, {"promote": False, "reason": "x" * 1000})
    assert (
        "label-free" in text
        and "not certified" in text
        and "Data version (md5) unknown" in text
        and "risk η=none" in text
    )
    assert "no answer threshold ρ" in text and "Gate: rejected" in text and len(text) < 1000

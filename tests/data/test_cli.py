"""`pcee data prepare` / `pcee data info` through the real CLI entry point."""

from __future__ import annotations

from pcee.cli import main
from pcee.data import load_dataset


def test_prepare_writes_snapshot_and_reports(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "prepare", "--data", "digits", "--out", str(out), "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "train     1079" in text and "val        359" in text and str(out.resolve()) in text
    assert load_dataset(f"prepared:{out}").info["seed"] == 3


def test_info_prints_sizes(capsys):
    assert main(["data", "info", "--data", "digits", "--val-size", "100", "--test-size", "0.1"]) == 0
    text = capsys.readouterr().out
    assert "1x8x8" in text and "val        100" in text and "test       180" in text


def test_bad_names_give_a_clear_error(tmp_path, capsys):
    assert main(["data", "info", "--data", "svhn"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'svhn'" in err and "imagefolder:<path>" in err
    assert main(["data", "info", "--data", "cifar10", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "cifar-10-batches-py" in err

"""`pcee train` end to end on digits: the outputs contract, atomic writes, clear errors."""

from __future__ import annotations

import pytest

import pcee.cli.train as train_cli
from pcee.cli import main
from tests.training.train_contract import check_contract

FAST = ["--data", "digits", "--model", "small-cnn", "--epochs", "3", "--lr", "0.1", "--no-progress", "--threads", "1"]


def test_train_cli_writes_contract(tmp_path, digits, capsys):
    out = tmp_path / "run"
    rc = main(["train", *FAST, "--regime", "mixed", "--out", str(out), "--data-version", "abc123", "--seed", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test acc" in printed and "cum MFLOPs" in printed and "rel. cost" in printed and str(out) in printed
    splits, meta = check_contract(out, digits)
    assert (
        meta["data_version"] == "abc123"
        and meta["train_config"]["regime"] == "mixed"
        and meta["train_config"]["seed"] == 1
    )
    assert len(meta["history"]) == 3 and meta["test_accuracy"][-1] > 0.5
    # what decided the weights besides the config: the pinned thread count, the machine, torch
    env = meta["training_environment"]
    assert meta["train_config"]["threads"] == 1 and env["threads"] == 1 and env["device"] == "cpu"
    assert env["deterministic_algorithms"] is True and {"cpu", "cpu_capability", "cpu_features", "torch"} <= set(env)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.json", "model.pt", "test.npz", "val.npz"]
    # one table row per exit
    rows = [line for line in printed.splitlines() if line.strip()[:1].isdigit() and "MFLOPs" not in line]
    assert len(rows) == meta["num_exits"]


@pytest.mark.parametrize(
    "flag, value, valid",
    [
        ("--regime", "bogus", "joint, disjoint, mixed, sweet, distill"),
        ("--optimizer", "adam", "sgd, adamw"),
        ("--schedule", "linear", "cosine, step"),
        ("--model", "nope", "small-cnn"),
        ("--data", "nodata", "digits"),
        ("--config", "huge", "digits"),
        ("--device", "tpu", "cpu, cuda, auto"),
        ("--augment", "mixup", "none, crop-flip"),
        ("--precision", "fp16", "fp32, bf16"),
        ("--data-placement", "gpu", "auto, device, host"),
        ("--threads", "0", "positive integer"),
    ],
)
def test_unknown_names_fail_with_valid_list(tmp_path, capsys, flag, value, valid):
    out = tmp_path / "run"
    args = ["train", *FAST, "--out", str(out), flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert value in err and valid in err
    assert not out.exists()


def test_failed_run_leaves_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = []
    real = train_cli.compute_outputs

    def fail_on_test_split(model, split, flops, **kw):
        calls.append(1)
        if len(calls) == 2:  # val done, die on test: a crash in the middle of producing the outputs
            raise RuntimeError("injected failure")
        return real(model, split, flops, **kw)

    monkeypatch.setattr(train_cli, "compute_outputs", fail_on_test_split)  # where `pcee train` looks it up
    with pytest.raises(RuntimeError, match="injected"):
        main(["train", *FAST, "--epochs", "1", "--out", str(out)])
    assert len(calls) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_run(tmp_path, digits, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    before = (out / "test.npz").read_bytes()
    import pcee.outputs as outputs

    def broken_save(self, path):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(outputs.ExitOutputs, "save", broken_save)
    with pytest.raises(OSError, match="injected"):
        main(["train", *FAST, "--epochs", "1", "--seed", "7", "--out", str(out)])
    assert (out / "test.npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

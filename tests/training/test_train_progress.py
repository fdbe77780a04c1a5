"""Long training reports itself: one line per epoch on the ``pcee.training`` logger (phase, epoch i/N,
train loss, per-exit validation accuracy, elapsed and remaining time), printed by ``pcee train``
wherever no progress bar is shown (stderr redirected to a file)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from pcee.training.config import TrainConfig
from pcee.training.trainer import EPOCH_LOGGER, format_duration, train_model

PCEE = Path(sys.executable).with_name("pcee")  # the console script users run
LINE = re.compile(
    r"^mixed/(?P<phase>\S+) epoch (?P<i>\d+)/(?P<n>\d+) \(phase epoch \d+/\d+\) train loss (?P<loss>\d+\.\d{4}) "
    r"val acc per exit \[(?P<acc>[0-9. ]+)\] elapsed (?P<elapsed>\S+) remaining (?P<remaining>\S+)$"
)


def test_one_line_per_epoch_with_loss_accuracy_and_times(digits, small_cnn, caplog):
    model = small_cnn()
    config = TrainConfig(regime="mixed", epochs=3, lr=0.1, seed=0)
    with caplog.at_level(logging.INFO, logger=EPOCH_LOGGER):
        history = train_model(model, digits, config, progress=False)
    records = [r for r in caplog.records if r.name == EPOCH_LOGGER]
    assert len(records) == len(history) == 3  # exactly one per epoch, over all phases
    for i, (rec, hist) in enumerate(zip(records, history), start=1):
        m = LINE.match(rec.getMessage())
        assert m, rec.getMessage()
        assert (int(m["i"]), int(m["n"])) == (i, 3) and m["phase"] == hist["phase"]
        assert float(m["loss"]) == round(hist["train_loss"], 4)
        assert [float(a) for a in m["acc"].split()] == [round(a, 3) for a in hist["val_accuracy"]]
        assert len(hist["val_accuracy"]) == model.num_exits
        fields = rec.pcee_epoch  # the same numbers, structured, for handlers that want them
        assert fields["epoch"] == i and fields["total_epochs"] == 3 and fields["elapsed_s"] > 0
        assert m["elapsed"] == format_duration(fields["elapsed_s"])
        assert m["remaining"] == format_duration(
            fields["elapsed_s"] / i * (3 - i)
        )  # the mean epoch time so far, times epochs left
    assert records[-1].getMessage().endswith("remaining 0.0s")  # nothing left after the last epoch
    assert records[0].pcee_epoch["elapsed_s"] < records[-1].pcee_epoch["elapsed_s"]


def test_without_validation_the_line_has_no_accuracy(digits, small_cnn, caplog):
    import dataclasses

    with caplog.at_level(logging.INFO, logger=EPOCH_LOGGER):
        train_model(
            small_cnn(),
            dataclasses.replace(digits, val=None),
            TrainConfig(regime="joint", epochs=1, seed=0),
            progress=False,
        )
    (rec,) = [r for r in caplog.records if r.name == EPOCH_LOGGER]
    assert (
        rec.getMessage().startswith("joint/") and "epoch 1/1" in rec.getMessage() and "val acc" not in rec.getMessage()
    )
    assert "elapsed" in rec.getMessage() and "remaining" in rec.getMessage()


def test_format_duration():
    assert format_duration(4.25) == "4.2s" and format_duration(187) == "3m07s" and format_duration(3720) == "1h02m"


def test_pcee_train_with_stderr_to_a_file_writes_the_epoch_lines(tmp_path):
    """`pcee train ... 2> log`: no terminal, no bar; the log gets one line per epoch anyway."""
    assert PCEE.exists(), f"pcee not found beside {sys.executable}"
    log = tmp_path / "train.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as err:
        proc = subprocess.run(
            [
                str(PCEE),
                "train",
                "--data",
                "digits",
                "--model",
                "small-cnn",
                "--epochs",
                "2",
                "--lr",
                "0.1",
                "--threads",
                "1",
                "--out",
                str(tmp_path / "run"),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            timeout=300,
            cwd=tmp_path,
        )
    text = log.read_text()
    assert proc.returncode == 0, proc.stdout + text
    lines = [line for line in text.splitlines() if LINE.match(line)]
    assert [LINE.match(line)["i"] + "/" + LINE.match(line)["n"] for line in lines] == ["1/2", "2/2"], text
    assert "\r" not in text  # no progress bar redraws in the file

"""Checks that a `pcee train` output directory holds a complete, valid outputs contract."""

from __future__ import annotations

import json

import numpy as np

from pcee.outputs import read_outputs_dir
from pcee.training import exit_accuracies, load_checkpoint
from pcee.training.evaluate import predict_all_exits


def check_contract(out, digits, world_size=1):
    splits, meta = read_outputs_dir(out)
    L = meta["num_exits"]
    for name in ("val", "test"):
        o = splits[name]
        ref = getattr(digits, name)
        assert o.logits.shape == (len(ref.y), L, digits.num_classes) and o.logits.dtype == np.float32
        assert np.array_equal(o.labels, ref.y) and o.labels.dtype == np.int64
        assert o.flops.dtype == np.float64 and np.all(np.diff(o.flops) > 0)
        assert np.isfinite(o.logits).all()
    for key in ("dataset", "model", "config", "data_version", "train_config", "flops", "num_exits", "test_accuracy"):
        assert key in meta, key
    assert meta["dataset"] == "digits" and meta["model"] == "small-cnn" and meta["world_size"] == world_size
    np.testing.assert_allclose(meta["flops"], splits["test"].flops)
    assert np.allclose(meta["test_accuracy"], exit_accuracies(splits["test"].logits, splits["test"].labels))
    # the checkpoint reproduces the written logits
    model = load_checkpoint(out)
    assert json.loads((out / "model.json").read_text())["name"] == "small-cnn"
    np.testing.assert_allclose(predict_all_exits(model, digits.test.x), splits["test"].logits, rtol=1e-4, atol=1e-4)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary dirs left behind"
    return splits, meta

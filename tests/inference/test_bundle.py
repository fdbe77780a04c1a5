"""ModelBundle save/load round trip: same architecture, weights, policy, FLOPs and answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pcee.bundle import ModelBundle
from pcee.models.registry import build_model
from pcee.outputs import ExitOutputs
from pcee.policies.registry import build_policy

torch.set_num_threads(1)


@pytest.fixture
def bundle():
    torch.manual_seed(0)
    model = build_model("small-cnn", widths=(8, 8, 16), downsample=(False, True, False)).eval()
    rng = np.random.default_rng(0)
    x = rng.random((200, 1, 8, 8), dtype=np.float32)
    with torch.inference_mode():
        logits = torch.stack(model(torch.as_tensor(x)), 1).numpy()
    labels = rng.integers(0, 10, 200)
    flops = np.array([1e4, 2e4, 4e4])
    policy = build_policy("pcee-ws", delta=0.11).fit(logits, labels, flops)
    return (
        ModelBundle(model, policy, flops, {"dataset": "synthetic", "input_shape": [1, 8, 8]}),
        x,
        ExitOutputs(logits, labels, flops),
    )


def test_round_trip(tmp_path, bundle):
    b, x, ref = bundle
    out = b.save(tmp_path / "bundle", reference=ref)
    assert sorted(p.name for p in out.iterdir()) == [
        "flops.json",
        "meta.json",
        "model.json",
        "policy.json",
        "reference.npz",
        "weights.pt",
    ]
    assert json.loads((out / "model.json").read_text())["name"] == "small-cnn"
    loaded = ModelBundle.load(out)
    assert loaded.meta == b.meta
    np.testing.assert_array_equal(loaded.flops, b.flops)
    assert loaded.policy.to_dict() == b.policy.to_dict()
    for k, v in b.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    r1, r2 = b.runner(batch_size=64).run(x), loaded.runner().run(x)
    for name in ("prediction", "exit", "confidence", "expected_accuracy", "flops"):
        np.testing.assert_array_equal(getattr(r1, name), getattr(r2, name))
    got = ModelBundle.load_reference(out)
    np.testing.assert_array_equal(got.logits, ref.logits)
    # saving again replaces the directory in one step, without the optional reference
    b.save(out)
    assert not (out / "reference.npz").exists() and ModelBundle.load_reference(out) is None


def test_load_errors(tmp_path, bundle):
    b, _, _ = bundle
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelBundle.load(tmp_path / "nope")
    out = b.save(tmp_path / "b")
    (out / "policy.json").unlink()
    with pytest.raises(FileNotFoundError, match="policy.json"):
        ModelBundle.load(out)
    with pytest.raises(ValueError, match="flops"):
        ModelBundle(b.model, b.policy, np.ones(2))

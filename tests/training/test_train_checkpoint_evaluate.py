import json

import numpy as np
import pytest
import torch

from pcee.training import compute_outputs, exit_accuracies, load_checkpoint, save_checkpoint
from pcee.training.evaluate import predict_all_exits


def test_checkpoint_round_trip(tmp_path, digits, small_cnn):
    model = small_cnn(seed=5)
    model.train()
    # move BatchNorm statistics away from their initial values so buffers are part of the check
    with torch.no_grad():
        model(torch.as_tensor(digits.train.x[:64]))
    weights, spec = save_checkpoint(tmp_path / "ckpt", model)
    assert weights.name == "model.pt" and spec.name == "model.json"
    meta = json.loads(spec.read_text())
    assert meta["name"] == "small-cnn" and meta["config"] == model.config and meta["num_exits"] == model.num_exits
    # the weights file is a plain state_dict: loadable with weights_only=True
    state = torch.load(weights, weights_only=True)
    assert set(state) == set(model.state_dict())

    loaded = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = digits.test.x[:50]
    np.testing.assert_array_equal(predict_all_exits(model, x), predict_all_exits(loaded, x))


def test_checkpoint_file_form_and_missing(tmp_path, small_cnn):
    model = small_cnn()
    weights, spec = save_checkpoint(tmp_path / "m.pt", model)
    assert spec == tmp_path / "m.json"
    assert load_checkpoint(weights).num_exits == model.num_exits
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_checkpoint(tmp_path / "nowhere")
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left behind"


def test_compute_outputs_contract_and_mode(digits, small_cnn):
    model = small_cnn()
    model.train()
    flops = np.array([1.0, 2.0, 3.0, 4.0])[: model.num_exits]
    out = compute_outputs(model, digits.val, flops, batch_size=100)
    assert model.training, "the caller's train/eval mode is restored"
    n = len(digits.val.y)
    assert out.logits.shape == (n, model.num_exits, digits.num_classes) and out.logits.dtype == np.float32
    assert out.labels.dtype == np.int64 and np.array_equal(out.labels, digits.val.y)
    assert out.flops.dtype == np.float64
    # batch size does not change the result (eval mode: BatchNorm uses running statistics)
    other = compute_outputs(model, digits.val, flops, batch_size=7)
    np.testing.assert_allclose(out.logits, other.logits, rtol=1e-5, atol=1e-5)
    # equals the model's own forward in eval mode
    model.eval()
    with torch.no_grad():
        ref = torch.stack(model(torch.as_tensor(digits.val.x)), dim=1).numpy()
    np.testing.assert_allclose(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert exit_accuracies(out.logits, out.labels).shape == (model.num_exits,)
    with pytest.raises(ValueError, match="one entry per exit"):
        compute_outputs(model, digits.val, np.ones(model.num_exits + 1))

"""``attach-exits``: exit heads on torchvision / timm backbones (random init, tiny configs, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pcee.bundle import ModelBundle
from pcee.calibration.scores import confidence
from pcee.cli import main
from pcee.inference.runner import EarlyExitRunner
from pcee.models.backbone import load_backbone_weights
from pcee.models.base import index_state
from pcee.models.flops import default_input_shape, measure_exit_flops
from pcee.models.registry import build_model
from pcee.policies.registry import build_policy

torch.set_num_threads(1)

BATCH = 3
TINY_TIMM_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]}
# (backbone, backbone_kwargs, img_size, expected stage names)
CASES = {
    "tv-resnet18": ("torchvision:resnet18", {}, 32, ["layer1", "layer2", "layer3", "layer4"]),
    "tv-efficientnet_b0": ("torchvision:efficientnet_b0", {}, 32, [f"features.{i}" for i in range(1, 9)]),
    "tv-mobilenet_v3_small": ("torchvision:mobilenet_v3_small", {}, 32, [f"features.{i}" for i in range(1, 13)]),
    "timm-resnet18": ("timm:resnet18", TINY_TIMM_RESNET, 32, ["layer1", "layer2", "layer3", "layer4"]),
    "timm-efficientnet_b0": ("timm:efficientnet_b0", {}, 32, [f"blocks.{i}" for i in range(7)]),
    "timm-vit_tiny": (
        "timm:vit_tiny_patch16_224",
        {"patch_size": 8, "depth": 4},
        32,
        [f"blocks.{i}" for i in range(4)],
    ),
}


def _make(case: str, **overrides):
    backbone, kwargs, size, _ = CASES[case]
    torch.manual_seed(0)
    return build_model("attach-exits", backbone=backbone, backbone_kwargs=kwargs, img_size=size, **overrides)


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request):
    model = _make(request.param).eval()
    size = model.config["img_size"]
    x = torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
    return request.param, model, x, full


def test_stages_and_logits(built):
    case, model, x, full = built
    assert model.stage_names() == CASES[case][3]
    assert model.num_exits == len(model.stage_names()) == len(full)  # default: an exit after every stage
    assert isinstance(model.exit_heads, torch.nn.ModuleList) and len(model.exit_heads) == model.num_exits
    for z in full:
        assert z.shape == (BATCH, 10) and torch.isfinite(z).all()
    head_ids = {id(p) for p in model.exit_heads.parameters()}
    assert all(id(p) not in head_ids for p in model.backbone.parameters())  # heads and backbone are disjoint


def test_segments_equal_full_forward_and_compaction_keeps_survivors(built):
    _, model, x, full = built
    keep = torch.tensor([True, False, True])
    with torch.no_grad():
        state = model.initial_state(x)
        for k in range(model.num_exits):
            state, z = model.forward_segment(k, state)
            torch.testing.assert_close(z, full[k], rtol=1e-5, atol=1e-5)
        state, _ = model.forward_segment(0, model.initial_state(x))
        state = index_state(state, keep)  # sample 1 left at exit 0
        for k in range(1, model.num_exits):
            state, z = model.forward_segment(k, state)
            torch.testing.assert_close(z, full[k][keep], rtol=1e-4, atol=1e-5)


def test_flops_strictly_increase(built):
    _, model, _, _ = built
    flops = measure_exit_flops(model, default_input_shape(model))
    assert flops.shape == (model.num_exits,) and flops[0] > 0 and np.all(np.diff(flops) > 0)


def test_rebuild_from_json_config(built):
    _, model, x, full = built
    config = json.loads(json.dumps(model.config))
    rebuilt = build_model("attach-exits", **config).eval()
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        for a, b in zip(rebuilt(x), full):
            torch.testing.assert_close(a, b)


def test_bundle_round_trip_and_runner_equals_decide(built, tmp_path):
    _, model, _, _ = built
    with torch.no_grad():  # sharper random heads, so that confidences spread and several exits answer
        for p in model.exit_heads.parameters():
            p.mul_(30.0)
    try:
        size = model.config["img_size"]
        rng = np.random.default_rng(0)
        x_val = rng.random((40, 3, size, size), dtype=np.float32)
        x_test = rng.random((23, 3, size, size), dtype=np.float32)
        with torch.inference_mode():
            val_logits = torch.stack(model(torch.as_tensor(x_val)), 1).numpy()
            logits = torch.stack(model(torch.as_tensor(x_test)), 1).numpy()
        flops = measure_exit_flops(model, (3, size, size))
        policy = build_policy("threshold").fit(val_logits, rng.integers(0, 10, 40), flops)
        policy.set_params(tau=float(np.median(confidence(val_logits[:, 0]))))
        expected = policy.decide(logits)
        result = EarlyExitRunner(model, policy, flops, batch_size=8).run(x_test)
        np.testing.assert_array_equal(result.exit, expected)
        assert len(np.unique(expected)) >= 2  # some samples leave early, others go on
        np.testing.assert_array_equal(result.prediction, logits[np.arange(len(x_test)), expected].argmax(1))

        out = ModelBundle(model, policy, flops, {"input_shape": [3, size, size]}).save(tmp_path / "bundle")
        loaded = ModelBundle.load(out)
        assert loaded.model.config == model.config and loaded.policy.to_dict() == policy.to_dict()
        again = loaded.runner(batch_size=8).run(x_test)
        for name in ("prediction", "exit", "flops"):
            np.testing.assert_array_equal(getattr(again, name), getattr(result, name))
        np.testing.assert_allclose(again.confidence, result.confidence, rtol=1e-5, atol=1e-6)
    finally:
        with torch.no_grad():
            for p in model.exit_heads.parameters():
                p.div_(30.0)


def test_exits_by_name_or_index_and_conv_head():
    model = _make("timm-resnet18", exits=["layer2", 0], head="conv").eval()
    assert model.exit_names == ["layer1", "layer2", "layer4"]  # sorted; the final exit is always added
    assert model.config["exits"] == ["layer2", 0]  # the config is kept as given, so it rebuilds the same
    assert isinstance(model.exit_heads[0][0], torch.nn.Conv2d)
    with torch.no_grad():
        assert [tuple(z.shape) for z in model(torch.rand(2, 3, 32, 32))] == [(2, 10)] * 3


@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"backbone": "timm:resnet81"}, ["timm:resnet18", "torchvision:", "timm:"]),
        ({"backbone": "torchvision:resnet19"}, ["torchvision:resnet18"]),
        ({"backbone": "resnet18"}, ["must start with", "timm:resnet18"]),
        ({"backbone": "torchvision:vit_b_16"}, ["not a supported architecture family", "ConvNeXt"]),
        ({"backbone": "timm:hf-hub:timm/resnet18.a1_in1k"}, ["never downloads", "--backbone-weights"]),
        ({"backbone": "timm:resnet18", "backbone_kwargs": {"pretrained": True}}, ["never downloads"]),
        ({"backbone": "torchvision:resnet18", "backbone_kwargs": {"weights": "DEFAULT"}}, ["never downloads"]),
        (
            {"backbone": "timm:resnet18", "backbone_kwargs": TINY_TIMM_RESNET, "exits": ["layer5"]},
            ["layer5", "0=layer1", "3=layer4"],
        ),
        ({"backbone": "timm:resnet18", "backbone_kwargs": TINY_TIMM_RESNET, "exits": [4]}, ["3=layer4"]),
        (
            {"backbone": "timm:vit_tiny_patch16_224", "backbone_kwargs": {"patch_size": 8, "depth": 2}, "head": "conv"},
            ["use head 'linear'"],
        ),
        ({"head": "mlp"}, ["linear, conv"]),
    ],
)
def test_bad_input_fails_clearly(overrides, needles):
    with pytest.raises(ValueError) as err:
        build_model("attach-exits", **overrides)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def _timm_checkpoint(tmp_path, in_chans=3, wrap=None, rename=None):
    import timm

    torch.manual_seed(123)
    net = timm.create_model("resnet18", pretrained=False, in_chans=in_chans, num_classes=7, **TINY_TIMM_RESNET)
    state = net.state_dict()  # includes the 7-way fc: ignored when loaded
    if rename:
        state = {rename.get(k, k): v for k, v in state.items()}
    path = tmp_path / "backbone.pt"
    torch.save({wrap: state} if wrap else state, path)
    return path, net.state_dict()


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_load_backbone_weights(tmp_path, wrap):
    path, ref = _timm_checkpoint(tmp_path, wrap=wrap)
    model = _make("timm-resnet18")
    assert model.backbone_pretrained is False
    load_backbone_weights(model, path)
    assert model.backbone_pretrained is True
    got = model.backbone.state_dict()
    for key, value in ref.items():
        if not key.startswith("fc."):
            assert torch.equal(got[key], value), key


def test_load_backbone_weights_errors(tmp_path):
    path, _ = _timm_checkpoint(tmp_path, rename={"layer1.0.conv1.weight": "layer1.0.convX.weight"})
    model = _make("timm-resnet18")
    with pytest.raises(ValueError) as err:
        load_backbone_weights(model, path)
    assert "missing keys: layer1.0.conv1.weight" in str(err.value) and "unexpected keys: layer1.0.convX.weight" in str(
        err.value
    )
    assert model.backbone_pretrained is False
    path, _ = _timm_checkpoint(tmp_path, in_chans=1)
    with pytest.raises(ValueError, match=r"wrongly shaped.*conv1.weight"):
        load_backbone_weights(model, path)
    with pytest.raises(ValueError, match="attach-exits"):
        load_backbone_weights(build_model("small-cnn"), path)


def test_pretrained_backbone_disjoint_trains_only_heads(tmp_path):
    from pcee.data.datasets import ArraySplit, DatasetSplits
    from pcee.training.config import TrainConfig
    from pcee.training.regimes import build_phases
    from pcee.training.trainer import train_model

    config = TrainConfig(regime="disjoint", epochs=1, batch_size=16, lr=0.1)
    phases = build_phases(config, 4, backbone_frozen=True)
    assert [(p.name, p.train_backbone, p.train_heads, p.loss_exits) for p in phases] == [
        ("heads", False, (0, 1, 2, 3), (0, 1, 2, 3))
    ]
    mixed = TrainConfig(regime="mixed", epochs=2)
    assert build_phases(mixed, 4, backbone_frozen=True) == build_phases(mixed, 4)  # mixed fine-tunes all, as before

    path, _ = _timm_checkpoint(tmp_path)
    model = load_backbone_weights(_make("timm-resnet18"), path)
    rng = np.random.default_rng(0)

    def split(n):
        return ArraySplit(rng.random((n, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64))

    data = DatasetSplits("random", split(48), split(16), split(16), 10, [str(i) for i in range(10)], (3, 32, 32))
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # weights and BN statistics
    heads_before = [[p.detach().clone() for p in h.parameters()] for h in model.exit_heads]
    history = train_model(model, data, config, progress=False)
    assert [h["phase"] for h in history] == ["heads"]
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    for head, before in zip(model.exit_heads, heads_before):  # every head trained, the final one included
        assert any(not torch.equal(p, b) for p, b in zip(head.parameters(), before))


def test_cli_train_with_json_config_and_backbone_weights(tmp_path, capsys):
    path, ref = _timm_checkpoint(tmp_path, in_chans=1)
    config = {"backbone": "timm:resnet18", "backbone_kwargs": TINY_TIMM_RESNET, "exits": ["layer2", "layer3"]}
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        "digits",
        "--model",
        "attach-exits",
        "--config",
        json.dumps(config),
        "--backbone-weights",
        str(path),
        "--regime",
        "disjoint",
        "--epochs",
        "1",
        "--lr",
        "0.1",
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "cum MFLOPs" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"] == "attach-exits" and meta["num_exits"] == 3 and meta["backbone_weights"] == str(path)
    assert meta["config"]["backbone"] == "timm:resnet18" and (
        meta["config"]["in_chans"],
        meta["config"]["img_size"],
    ) == (1, 8)
    assert [h["phase"] for h in meta["history"]] == ["heads"] and np.all(np.diff(meta["flops"]) > 0)
    weights = torch.load(out / "model.pt", weights_only=True)
    for key, value in ref.items():  # the frozen backbone is the checkpoint's
        if not key.startswith("fc."):
            assert torch.equal(weights[f"backbone.{key}"], value), key
    # --backbone-weights needs attach-exits
    assert (
        main(
            [
                "train",
                "--data",
                "digits",
                "--model",
                "small-cnn",
                "--backbone-weights",
                str(path),
                "--out",
                str(tmp_path / "no"),
            ]
        )
        == 2
    )
    assert "needs --model attach-exits" in capsys.readouterr().err


def test_cli_flops_with_json_config(capsys):
    config = {"backbone": "timm:resnet18", "backbone_kwargs": TINY_TIMM_RESNET, "in_chans": 1, "img_size": 8}
    assert main(["flops", "--model", "attach-exits", "--config", json.dumps(config), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["input_shape"] == [1, 8, 8] and len(table["exits"]) == 4
    flops = [e["flops_m"] for e in table["exits"]]
    assert all(b > a for a, b in zip(flops, flops[1:]))
    assert main(["flops", "--model", "attach-exits", "--config", "{not json"]) == 2
    assert "not valid JSON" in capsys.readouterr().err

"""Registry behaviour: presets, overrides, and clear errors naming the valid choices."""

from __future__ import annotations

import json

import pytest
import torch

from pcee.models import build_model, list_models, list_presets
from pcee.models.msdnet import MSDNetConfig
from pcee.models.registry import config_fields, default_preset, register_model


def test_unknown_model_lists_valid_models():
    with pytest.raises(ValueError) as err:
        build_model("no-such-net")
    for name in list_models():
        assert name in str(err.value)


def test_unknown_preset_lists_valid_presets():
    with pytest.raises(ValueError) as err:
        build_model("msdnet", "cifar1000")
    assert "cifar1000" in str(err.value)
    for preset in list_presets("msdnet"):
        assert preset in str(err.value)
    with pytest.raises(ValueError, match="valid models"):
        list_presets("nope")


def test_unknown_override_lists_valid_options():
    with pytest.raises(ValueError) as err:
        build_model("small-cnn", depth=3)
    assert "depth" in str(err.value) and "widths" in str(err.value)


@pytest.mark.parametrize(
    "name, overrides, needle",
    [
        ("msdnet", {"prune": "medium"}, "max, min"),
        ("msdnet", {"step_mode": "odd"}, "even, lin_grow"),
        ("msdnet", {"bn_factor": (1, 2)}, "one entry per scale"),
        ("vit", {"exit_blocks": (2, 4)}, "ending with the last block"),
        ("vit", {"patch_size": 5}, "not divisible"),
        ("resnet18", {"stem": "tiny"}, "cifar, imagenet"),
        ("small-cnn", {"downsample": (True,)}, "one per block"),
    ],
)
def test_bad_values_fail_with_the_valid_choices(name, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        build_model(name, **overrides)


def test_default_preset_and_overrides():
    m = build_model("small-cnn")
    assert m.preset == default_preset("small-cnn") == "digits"
    assert (m.config["in_chans"], m.config["img_size"], m.config["num_classes"]) == (1, 8, 10)
    m = build_model("small-cnn", "cifar", num_classes=7)
    assert m.config["num_classes"] == 7 and m.config["in_chans"] == 3
    assert m(torch.rand(2, 3, 32, 32))[-1].shape == (2, 7)
    assert set(m.config) == set(config_fields("small-cnn"))


def test_config_is_json_and_rebuilds_from_json_alone():
    m = build_model("msdnet", "cifar-budgeted", num_classes=10)
    text = json.dumps({"name": m.model_name, "config": m.config})
    spec = json.loads(text)
    rebuilt = build_model(spec["name"], **spec["config"])
    assert rebuilt.config == m.config and rebuilt.steps == m.steps == [1, 2, 3, 4, 5]
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in m.parameters())


def test_msdnet_presets_follow_the_port():
    anytime = build_model("msdnet", "cifar100-anytime")
    assert anytime.steps == [4, 2, 2, 2, 2, 2, 2] and anytime.num_exits == 7
    assert build_model("msdnet", "imagenet").steps == [4, 4, 4, 4, 4]
    # the port's CIFAR anytime network has about 3.07M parameters (7 blocks, growth 6)
    assert 3.0e6 < sum(p.numel() for p in anytime.parameters()) < 3.15e6
    assert MSDNetConfig().steps == anytime.steps


def test_registering_a_duplicate_name_is_refused():
    list_models()  # load the built-ins

    with pytest.raises(ValueError, match="already registered"):

        @register_model("msdnet", config_cls=MSDNetConfig)
        class Other(torch.nn.Module):  # noqa: F841
            pass


def test_preset_attribute_names_the_architecture_only_when_unmodified():
    assert build_model("msdnet", "cifar10-anytime").preset == "cifar10-anytime"
    assert build_model("msdnet", "cifar100-anytime", num_classes=100).preset == "cifar100-anytime"
    assert build_model("msdnet", "cifar100-anytime", num_classes=10).preset is None
    m = build_model("msdnet", "cifar10-anytime")
    assert build_model(m.model_name, **m.config).preset is None  # rebuilt from config alone: same net, preset unknown

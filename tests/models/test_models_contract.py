"""Contract tests run on every registered model and preset (timm tests/test_models.py style)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pcee.models import MultiExitModel, build_model, index_state, list_models, list_presets

torch.set_num_threads(1)

CASES = [(name, preset) for name in list_models() for preset in list_presets(name)]
IDS = [f"{n}-{p}" for n, p in CASES]
BATCH = 3


def _input_size(model: MultiExitModel) -> int:
    # ImageNet-sized presets run at 64x64 here (their convs accept it) to keep the tests cheap; the
    # ViT's position embedding fixes its size.
    size = model.config["img_size"]
    return size if size <= 32 or model.model_name == "vit" else 64


def _make(name: str, preset: str) -> tuple[MultiExitModel, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(name, preset).eval()
    size = _input_size(model)
    x = torch.rand(BATCH, model.config["in_chans"], size, size, generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def built(request):
    name, preset = request.param
    model, x = _make(name, preset)
    with torch.no_grad():
        full = model(x)
    return model, x, full


def test_registry_lists_every_architecture():
    assert {"small-cnn", "msdnet", "vit", "resnet18"} <= set(list_models())
    assert set(list_presets("msdnet")) == {"cifar100-anytime", "cifar10-anytime", "cifar-budgeted", "imagenet"}


def test_outputs_are_L_logits_of_shape_B_K(built):
    model, x, full = built
    K = model.config["num_classes"]
    assert isinstance(full, list) and len(full) == model.num_exits >= 2
    for z in full:
        assert z.shape == (BATCH, K)
        assert torch.isfinite(z).all()
    # different exits are different classifiers
    assert not torch.allclose(full[0], full[-1])


def test_exit_heads_are_one_module_per_exit_disjoint_from_backbone(built):
    model, _, _ = built
    assert isinstance(model.exit_heads, torch.nn.ModuleList) and len(model.exit_heads) == model.num_exits
    head_ids = [{id(p) for p in h.parameters()} for h in model.exit_heads]
    assert all(ids for ids in head_ids)
    assert sum(map(len, head_ids)) == len(set().union(*head_ids))  # no parameter shared by two heads
    backbone = [p for p in model.parameters() if id(p) not in set().union(*head_ids)]
    assert backbone  # heads are not the whole model


def test_segment_by_segment_equals_full_forward(built):
    model, x, full = built
    with torch.no_grad():
        state = model.initial_state(x)
        for k in range(model.num_exits):
            state, z = model.forward_segment(k, state)
            torch.testing.assert_close(z, full[k], rtol=1e-5, atol=1e-5)


def test_compacting_the_state_keeps_the_survivors_logits(built):
    model, x, full = built
    keep = torch.tensor([True, False, True])
    with torch.no_grad():
        state, _ = model.forward_segment(0, model.initial_state(x))
        state = index_state(state, keep)  # samples 1 left at exit 0
        for k in range(1, model.num_exits):
            state, z = model.forward_segment(k, state)
            assert z.shape[0] == int(keep.sum())
            torch.testing.assert_close(z, full[k][keep], rtol=1e-4, atol=1e-5)


def test_train_mode_forward_and_backward_reach_every_head(built):
    model = copy.deepcopy(built[0]).train()  # a copy: training mode moves BatchNorm statistics
    x = built[1]
    loss = sum(z.logsumexp(1).mean() for z in model(x[:2]))
    loss.backward()
    for head in model.exit_heads:
        grads = [p.grad for p in head.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_rebuild_from_config_round_trip(built):
    model, x, full = built
    config = json.loads(json.dumps(model.config))  # what model.json stores
    rebuilt = build_model(model.model_name, **config).eval()
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        for a, b in zip(rebuilt(x), full):
            torch.testing.assert_close(a, b)

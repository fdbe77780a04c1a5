"""A model class of the user's own, without editing pcee (docs/models.md).

The example package examples/pcee-example-models is installed in the project's environment (a dev
dependency with an editable path source), so its ``pcee.models`` entry points are real here.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import pcee.models.registry as registry
from pcee.bundle import ModelBundle
from pcee.cli import main
from pcee.models import ContractError, MultiExitModel, build_model, check_model, list_models
from pcee.models.registry import data_overrides, is_builtin
from pcee.outputs import read_outputs_dir
from pcee.policies.registry import build_policy
from pcee.training.checkpoint import load_checkpoint

torch.set_num_threads(1)

ENTRY_POINT = "tiny-mlp-exits"
IMPORT_PATH = "pcee_example_models.nets:TinyMLPExits"
# listed names that cannot be built without options of their own (none today: attach-exits builds
# torchvision:resnet18 with random weights by default)
NEEDS_CONFIG: frozenset[str] = frozenset()


@pytest.fixture(scope="module")
def digits():
    from pcee.data.datasets import load_dataset

    return load_dataset("digits", seed=0)


# --- naming: entry point, import path, unknown names ---------------------------------------------


def test_entry_points_are_installed_and_listed():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pcee.models")}
    assert eps[ENTRY_POINT] == IMPORT_PATH
    assert eps["tiny-conv-exits"] == "pcee_example_models.nets:TinyConvExits"
    names = list_models()
    assert {ENTRY_POINT, "tiny-conv-exits", "small-cnn"} <= set(names) and names == sorted(names)
    assert is_builtin("small-cnn") and not is_builtin(ENTRY_POINT) and not is_builtin(IMPORT_PATH)


@pytest.mark.parametrize("name", [ENTRY_POINT, IMPORT_PATH])
def test_example_builds_by_name_and_rebuilds_from_its_json(name):
    torch.manual_seed(0)
    model = build_model(name, **data_overrides(name, (3, 32, 32), 7), hidden=(16, 8))
    assert model.model_name == name  # what model.json records, so the rebuild imports the same class
    assert type(model).__module__ == "pcee_example_models.nets" and model.num_exits == 2
    # the whole config, defaults included, as JSON gives it back
    assert model.config == {"num_classes": 7, "in_chans": 3, "img_size": 32, "hidden": [16, 8], "dropout": 0.0}
    rebuilt = build_model(name, **json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model.eval()(x), rebuilt.eval()(x)):
            assert a.shape == (4, 7)
            torch.testing.assert_close(a, b)


def test_config_cls_convention_and_presets():
    model = build_model("tiny-conv-exits", "cifar", num_classes=5)
    assert model.config == {"num_classes": 5, "in_chans": 3, "img_size": 32, "widths": [16, 32, 64]}
    assert build_model("tiny-conv-exits", "cifar").preset == "cifar" and model.preset is None
    with pytest.raises(ValueError, match="unknown option.*depth.*widths"):
        build_model("tiny-conv-exits", depth=3)
    with pytest.raises(ValueError, match="unknown config 'huge'.*cifar, digits"):
        build_model("tiny-conv-exits", "huge")


@pytest.mark.parametrize(
    "name, needles",
    [
        ("no_such_pkg.nets:Net", ["cannot import module 'no_such_pkg.nets'", "'no_such_pkg' is not installed"]),
        ("pcee_example_models.nets:NoSuchNet", ["module 'pcee_example_models.nets' has no attribute 'NoSuchNet'"]),
        ("pcee.models.base:index_state", ["not a torch.nn.Module class"]),
        ("no-such-net", ["unknown model 'no-such-net'", ENTRY_POINT, "small-cnn", "import path"]),
    ],
)
def test_unknown_or_wrong_names_fail_clearly(name, needles):
    with pytest.raises(ValueError) as err:
        build_model(name)
    for needle in needles:
        assert needle in str(err.value)


def test_user_options_are_validated():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\].*hidden"):
        build_model(ENTRY_POINT, depth=3)
    with pytest.raises(ValueError, match="'hidden'.*not JSON-serialisable"):
        build_model(ENTRY_POINT, hidden=object())


def test_entry_point_that_fails_to_load_names_its_target(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="broken-net", value="no_such_plugin.nets:Net", group="pcee.models")
    monkeypatch.setattr(registry, "_entry_points", lambda: {"broken-net": ep})
    with pytest.raises(ValueError, match="entry point 'broken-net'.*no_such_plugin.nets:Net.*could not be loaded"):
        build_model("broken-net")


# --- pcee train, checkpoint, bundle, runner, service ----------------------------------------------


@pytest.mark.parametrize("name", [ENTRY_POINT, IMPORT_PATH])
def test_train_cli_checkpoint_bundle_and_runner(tmp_path, digits, name):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        "digits",
        "--model",
        name,
        "--epochs",
        "1",
        "--regime",
        "joint",
        "--optimizer",
        "adamw",
        "--lr",
        "0.01",
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    spec = json.loads((out / "model.json").read_text())
    assert spec["name"] == name and spec["config"]["in_chans"] == 1 and spec["config"]["img_size"] == 8
    outputs, meta = read_outputs_dir(out)
    assert meta["model"] == name and meta["num_exits"] == 3 and outputs["val"].logits.shape[1:] == (3, 10)

    model = load_checkpoint(out)  # rebuilt by name: the entry point or import path
    assert model.model_name == name
    x = np.ascontiguousarray(digits.test.x[:120], dtype=np.float32)
    with torch.inference_mode():
        logits = torch.stack(model(torch.as_tensor(x)), 1).numpy()  # (N, L, K)

    val = outputs["val"]
    policy = build_policy("pcee-ws", delta=0.8).fit(val.logits, val.labels, val.flops)
    bundle = ModelBundle(model, policy, val.flops, {"dataset": "digits", "input_shape": [1, 8, 8]})
    saved = bundle.save(tmp_path / "bundle")
    assert json.loads((saved / "model.json").read_text()) == {"name": name, "config": model.config}
    loaded = ModelBundle.load(saved)
    assert type(loaded.model) is type(model) and loaded.model.model_name == name
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    with torch.inference_mode():
        np.testing.assert_array_equal(torch.stack(loaded.model(torch.as_tensor(x)), 1).numpy(), logits)

    # early exit with compaction answers exactly what "every exit, then policy.decide" answers
    result = loaded.runner(batch_size=32).run(x)
    exits = policy.decide(logits)
    assert len(np.unique(exits)) >= 2  # some samples leave early: the runner compacts its batches
    np.testing.assert_array_equal(result.exit, exits)
    np.testing.assert_array_equal(result.prediction, logits[np.arange(len(x)), exits].argmax(1))
    np.testing.assert_array_equal(result.flops, val.flops[exits])

    # the service's loader rebuilds it the same way
    from pcee.serving.model_source import load_served_model

    served = load_served_model(saved, "v1", batch_size=32)
    assert served.num_exits == 3 and served.input_shape == (1, 8, 8)
    np.testing.assert_array_equal(served.runner.run(x).exit, exits)


def test_bundle_without_model_name_explains_the_ways_to_name_a_model():
    policy = build_policy("pcee-ws", delta=0.5)
    model = _Good()
    with pytest.raises(ValueError, match="no model_name.*import path 'package.module:ClassName'.*pcee.models"):
        ModelBundle(model, policy, np.ones(model.num_exits))


# --- the contract check ---------------------------------------------------------------------------


class _Good(MultiExitModel):
    """A correct 3-exit MLP on (B, 1, 4, 4); subclasses below break one rule each."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 8), nn.Linear(8, 8), nn.Linear(8, 8)])
        self.exit_heads = nn.ModuleList(nn.Linear(8, num_classes) for _ in range(3))

    @property
    def num_exits(self):
        return len(self.blocks)

    def initial_state(self, x):
        return x.flatten(1)

    def forward_segment(self, k, state):
        h = torch.relu(self.blocks[k](state))
        return h, self.exit_heads[k](h)


class _WrongLogitsAtExit1(_Good):
    def forward_segment(self, k, state):
        h, z = super().forward_segment(k, state)
        return h, (torch.cat([z, z[:, :1]], 1) if k == 1 else z)  # (B, K + 1) at exit 1


class _StateWithoutBatchDim(_Good):
    def forward_segment(self, k, state):
        h, z = super().forward_segment(k, state)
        return h.mean(0), z  # (8,): the batch is gone


class _DictState(_Good):
    def initial_state(self, x):
        return {"h": x.flatten(1)}

    def forward_segment(self, k, state):
        h, z = super().forward_segment(k, state["h"])
        return {"h": h}, z


class _LogitsOnly(_Good):
    def forward_segment(self, k, state):
        return super().forward_segment(k, state)[1]


class _ZeroExits(_Good):
    @property
    def num_exits(self):
        return 0


class _ForwardDisagrees(_Good):
    def forward(self, x):
        return [z * 2 for z in super().forward(x)]


class _BatchCoupled(_Good):
    def forward_segment(self, k, state):
        h, z = super().forward_segment(k, state)
        return h - h.mean(0, keepdim=True), z  # a sample's later logits depend on the rest of the batch


class _NoExitHeads(_Good):
    def __init__(self) -> None:
        super().__init__()
        self.heads = self.exit_heads
        del self.exit_heads

    def forward_segment(self, k, state):
        h = torch.relu(self.blocks[k](state))
        return h, self.heads[k](h)


class _NoForward(nn.Module):
    """The segment methods without MultiExitModel (so no forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Good()
        self.exit_heads = self.inner.exit_heads

    num_exits = 3

    def initial_state(self, x):
        return self.inner.initial_state(x)

    def forward_segment(self, k, state):
        return self.inner.forward_segment(k, state)


def test_a_correct_model_passes():
    model = _Good().train()
    check_model(model, (1, 4, 4))
    assert model.training  # the mode is restored
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "cls, needles",
    [
        (_WrongLogitsAtExit1, ["forward_segment(1, state)", "shape (3, 5)", "expected (3, 4)"]),
        (_StateWithoutBatchDim, ["forward_segment(0, state)", "tensor(8,)", "batch (3) on dim 0"]),
        (_DictState, ["initial_state(x)", "dict", "batch (3) on dim 0"]),
        (_LogitsOnly, ["forward_segment(0, state) must return (state, logits)", "tensor(3, 4)"]),
        (_ZeroExits, ["num_exits must be a positive int, got 0"]),
        (_ForwardDisagrees, ["forward(x)[0]", "differs from forward_segment(0, state)"]),
        (_BatchCoupled, ["forward_segment(2, state)", "compacted with index_state"]),
        (_NoExitHeads, ["exit_heads is missing", "training regimes"]),
        (_NoForward, ["forward(x) is missing"]),
    ],
)
def test_broken_models_fail_naming_the_method_and_shape(cls, needles):
    with pytest.raises(ContractError) as err:
        check_model(cls(), (1, 4, 4), batch=3)
    assert isinstance(err.value, ValueError)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


BROKEN_MODULE = """
import torch
from torch import nn
from pcee.models.base import MultiExitModel


class WrongLogits(MultiExitModel):
    def __init__(self, num_classes=10, in_chans=1, img_size=8):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(in_chans * img_size * img_size, 8), nn.Linear(8, 8)])
        self.exit_heads = nn.ModuleList([nn.Linear(8, num_classes), nn.Linear(8, num_classes + 1)])

    @property
    def num_exits(self):
        return 2

    def initial_state(self, x):
        return x.flatten(1)

    def forward_segment(self, k, state):
        h = torch.relu(self.blocks[k](state))
        return h, self.exit_heads[k](h)
"""


def test_build_model_rejects_a_broken_user_class_early(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_user_nets.py").write_text(textwrap.dedent(BROKEN_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_USER_SPECS", {})
    monkeypatch.delitem(sys.modules, "broken_user_nets", raising=False)
    with pytest.raises(ContractError, match=r"forward_segment\(1, state\) returned logits of shape \(3, 11\)"):
        build_model("broken_user_nets:WrongLogits")
    # and `pcee train` stops before training, with the same message and exit code 2
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--data",
            "digits",
            "--model",
            "broken_user_nets:WrongLogits",
            "--epochs",
            "1",
            "--no-progress",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 2 and "forward_segment(1, state)" in capsys.readouterr().err and not out.exists()
    monkeypatch.delitem(sys.modules, "broken_user_nets", raising=False)


def _contract_cases():
    cases = []
    for name in list_models():
        if name in NEEDS_CONFIG:
            continue
        cases.append(pytest.param(name, id=name))
    return cases


@pytest.mark.parametrize("name", _contract_cases())
def test_contract_check_passes_for_every_listed_model(name):
    torch.manual_seed(0)
    model = build_model(name)  # the default preset: 8x8 digits or 32x32 CIFAR sized
    shape = (model.config["in_chans"], model.config["img_size"], model.config["img_size"])
    check_model(model, shape, batch=3)

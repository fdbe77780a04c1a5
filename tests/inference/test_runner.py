"""EarlyExitRunner equals "compute every exit, then policy.decide", on random small models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pcee.inference.runner import EarlyExitRunner
from pcee.models.base import MultiExitModel
from pcee.models.registry import build_model
from pcee.policies.registry import build_policy

torch.set_num_threads(1)


class TupleStateModel(MultiExitModel):
    """A toy model whose hidden state is a (tensor, [tensor]) tuple, to exercise index_state."""

    def __init__(self, dim: int = 12, num_classes: int = 5, num_exits: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_exits))
        self.exit_heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_exits))
        self.model_name, self.config = "toy", {}

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def initial_state(self, x):
        h = x.flatten(1)
        return (h, [torch.zeros_like(h)])

    def forward_segment(self, k, state):
        h, (acc,) = state
        h = torch.tanh(self.blocks[k](h))
        acc = acc + h  # a second state tensor carried along
        return (h, [acc]), self.exit_heads[k](h + 0.1 * acc)


def all_exit_logits(model, x):
    with torch.inference_mode():
        return torch.stack(model.eval()(torch.as_tensor(x)), dim=1).numpy()


def random_small_cnn():
    model = build_model("small-cnn", widths=(8, 8, 16), downsample=(False, True, False))
    with torch.no_grad():  # sharper random heads, so that confidences spread over many bins
        for p in model.exit_heads.parameters():
            p.mul_(30.0)
    return model


CASES = {
    "small-cnn": (random_small_cnn, (1, 8, 8)),
    "toy": (lambda: TupleStateModel(dim=12), (3, 2, 2)),
}


@pytest.mark.parametrize("model_name", sorted(CASES))
@pytest.mark.parametrize(
    "policy_name,params",
    [
        ("pcee", {"min_count": 1}),
        ("pcee-ws", {}),
        ("threshold", {}),
        ("msdnet-budget", {"q": 1.0}),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_runner_equals_all_exits_then_decide(model_name, policy_name, params, seed):
    build, shape = CASES[model_name]
    torch.manual_seed(seed)
    model = build()
    rng = np.random.default_rng(seed)
    x_val = rng.random((300, *shape), dtype=np.float32)
    x_test = rng.random((203, *shape), dtype=np.float32)
    val_logits = all_exit_logits(model, x_val)
    # labels: exit 1 is right more often where it is more confident, else the final exit is right,
    # so that reliability maps rise with confidence and PCEE's decisions are non-trivial
    from pcee.calibration.scores import confidence as conf_fn

    rank = np.argsort(np.argsort(conf_fn(val_logits[:, 0]))) / len(val_logits)
    labels = np.where(rng.random(300) < rank, val_logits[:, 0].argmax(1), val_logits[:, -1].argmax(1))
    flops = np.cumsum(np.arange(1, model.num_exits + 1, dtype=np.float64))
    policy = build_policy(policy_name, **params).fit(val_logits, labels, flops)
    # put the swept parameter where it splits the samples, so that several exits answer
    if policy_name in ("pcee", "pcee-ws"):
        values = np.unique(policy.map_values(val_logits)[:, 0])
        policy.set_params(delta=float(values[len(values) // 2]))
    elif policy_name == "threshold":
        policy.set_params(tau=float(np.median(conf_fn(val_logits[:, 0]))))

    logits = all_exit_logits(model, x_test)
    expected_exits = policy.decide(logits)
    result = EarlyExitRunner(model, policy, flops, batch_size=64).run(x_test)

    np.testing.assert_array_equal(result.exit, expected_exits)
    rows = np.arange(len(x_test))
    np.testing.assert_array_equal(result.prediction, logits[rows, expected_exits].argmax(1))
    np.testing.assert_array_equal(result.flops, flops[expected_exits])
    from pcee.calibration.scores import confidence

    score = policy.get_params().get("score", "max_prob")
    conf_all = confidence(logits, score)
    np.testing.assert_allclose(result.confidence, conf_all[rows, expected_exits], rtol=1e-5, atol=1e-6)
    computed = np.arange(model.num_exits)[None, :] <= expected_exits[:, None]
    assert np.array_equal(np.isfinite(result.confidences), computed)
    np.testing.assert_allclose(result.confidences[computed], conf_all[computed], rtol=1e-5, atol=1e-6)
    for level in range(model.num_exits):
        m = expected_exits == level
        if m.any():
            np.testing.assert_allclose(
                result.expected_accuracy[m], policy.expected_accuracy(level, logits[m, level]), atol=1e-6
            )
    # a non-trivial mix: some samples leave early, others go on
    assert len(np.unique(result.exit)) >= 2


def test_runner_really_skips_work():
    """Segments after everyone left are never run; later segments see only the survivors."""
    torch.manual_seed(0)
    model = TupleStateModel(dim=12)
    seen: list[tuple[int, int]] = []
    original = model.forward_segment

    def spy(k, state):
        seen.append((k, state[0].shape[0]))
        return original(k, state)

    model.forward_segment = spy  # type: ignore[method-assign]
    x = np.random.default_rng(0).random((50, 3, 2, 2), dtype=np.float32)
    flops = np.array([1.0, 2.0, 3.0, 4.0])
    logits = all_exit_logits(TupleStateModel(dim=12), x)  # any logits: threshold needs no fit data
    everyone = build_policy("threshold", tau=0.0).fit(logits, None, flops)
    res = EarlyExitRunner(model, everyone, flops, batch_size=20, min_rows=0).run(x)
    assert (res.exit == 0).all() and seen == [(0, 20), (0, 20), (0, 10)]
    assert np.isnan(res.confidences[:, 1:]).all()
    seen.clear()
    nobody = build_policy("threshold", tau=1.0).fit(logits, None, flops)
    res = EarlyExitRunner(model, nobody, flops, batch_size=50).run(x)
    assert (res.exit == 3).all() and seen == [(k, 50) for k in range(4)]
    # a batch is never padded (min_rows pads survivor sets only)
    seen.clear()
    res = EarlyExitRunner(model, everyone, flops, batch_size=20).run(x)
    assert (res.exit == 0).all() and seen == [(0, 20), (0, 20), (0, 10)]
    from pcee.calibration.scores import confidence

    s = confidence(all_exit_logits(model, x))
    most = build_policy("threshold", tau=float(np.quantile(s[:, 0], 0.3))).fit(logits, None, flops)
    seen.clear()
    res = EarlyExitRunner(model, most, flops, batch_size=50).run(x)
    n_alive = [int((res.exit >= k).sum()) for k in range(4)]
    assert 0 < n_alive[1] < 16  # the survivors of exit 1 run padded, up to min(batch, min_rows) = 16 rows
    assert seen == [(k, max(n, 16)) for k, n in enumerate(n_alive) if n > 0], (seen, n_alive)


def test_runner_bad_inputs():
    model = TupleStateModel()
    flops = np.ones(4)
    pol = build_policy("threshold")
    with pytest.raises(ValueError, match="flops"):
        EarlyExitRunner(model, pol, np.ones(3))
    with pytest.raises(ValueError, match="batch_size"):
        EarlyExitRunner(model, pol, flops, batch_size=0)
    with pytest.raises(ValueError, match="oracle"):
        EarlyExitRunner(model, build_policy("oracle"), flops)

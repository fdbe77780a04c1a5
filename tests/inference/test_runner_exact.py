"""The optimised EarlyExitRunner gives bit-identical answers.

- its decisions (the policy's rule, ``policy.exit_rule()``, applied by the runner in numpy or in its
  torch form on the device) equal ``policy.decide`` on many random logits with ties at the threshold,
  at bin edges, duplicated maxima and saturated scores, for every deployable policy;
- every answer column equals the reference (``policy.decide`` on a full forward, then numpy) bit
  for bit, for small-cnn, MSDNet and an attach-exits model, with decide="numpy" and "torch";
- the switches: ``decide``, ``min_rows`` (padding) and the opt-in ``fuse_bn`` / ``channels_last``,
  which are documented as not bit-identical and only promised close.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pcee.policies.rules as rules_mod
from pcee.calibration.scores import confidence, torch_confidence
from pcee.inference.optimize import fuse_conv_bn
from pcee.inference.runner import EarlyExitRunner
from pcee.models.registry import build_model
from pcee.policies.registry import build_policy
from tests.inference.exactness import LogitsModel, assert_answers, reference_columns, spy_rows, tie_logits

torch.set_num_threads(1)


def fitted_policies(rng: np.random.Generator, val: np.ndarray, flops: np.ndarray):
    """(label, fitted policy) for every deployable policy, with parameters on exact ties where they have one."""
    n = len(val)
    s0 = confidence(val[:, 0])
    # labels: right more often where the exit is confident, so maps rise and several exits answer
    labels = np.where(rng.random(n) < s0, val[:, 0].argmax(1), rng.integers(0, val.shape[2], size=n))
    out = []
    for score in ("max_prob", "entropy", "margin"):
        tau = float(confidence(val[7, 0], score))  # an exact tie with row 7 (and its copies)
        out.append((f"threshold-{score}", build_policy("threshold", tau=tau, score=score).fit(val, labels, flops)))
    out.append(("threshold-1.0", build_policy("threshold", tau=1.0).fit(val, labels, flops)))  # tie with saturated rows
    temp = build_policy("temperature").fit(val, labels, flops)
    temp.set_params(tau=float(temp.expected_accuracy(0, val[3:4, 0])[0]))
    out.append(("temperature", temp))
    for q in (0.5, 2.0):
        out.append((f"msdnet-budget-{q}", build_policy("msdnet-budget", q=q).fit(val, labels, flops)))
    out.append(("eero", build_policy("eero", budget=0.6).fit(val, labels, flops)))
    for binning in ("equal_width", "equal_mass"):
        for score in ("max_prob", "margin"):
            pol = build_policy("pcee", min_count=1, binning=binning, score=score).fit(val, labels, flops)
            values = np.unique(pol.map_values(val)[:, 0])
            pol.set_params(delta=float(values[len(values) // 2]))  # exactly one of the map values
            out.append((f"pcee-{binning}-{score}", pol))
    ws = build_policy("pcee-ws").fit(val, labels, flops)
    values = np.unique(ws.map_values(val)[:, 0])
    ws.set_params(delta=float(values[len(values) // 3]))
    out.append(("pcee-ws", ws))
    rc = build_policy("risk-controlled", alpha=0.3).fit(val, labels, flops)
    out.append(("risk-controlled", rc))
    return out


@pytest.mark.parametrize("k", [2, 3, 10, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_decisions_equal_decide_with_ties(k, seed):
    rng = np.random.default_rng(seed)
    num_exits = 4
    flops = np.array([1.0, 2.0, 3.5, 5.0])
    val = tie_logits(rng, 300, num_exits, k)
    test = np.concatenate([val, tie_logits(rng, 500, num_exits, k)])  # val rows: ties with fitted thresholds
    test = test[rng.permutation(len(test))]
    model = LogitsModel(num_exits)
    asked = 0  # rows the torch rule was unsure of, decided by numpy from their kept logits
    for label, policy in fitted_policies(rng, val, flops):
        assert policy.exit_rule().on_device("cpu") is not None, label  # a torch form: not asked on the host
        ref = reference_columns(policy, test, policy.score)
        for decide in ("numpy", "torch"):
            for batch_size in (64, 13):  # 64: survivor sets padded to 16; 13: never below 13 rows
                runner = EarlyExitRunner(model, policy, flops, batch_size=batch_size, decide=decide)
                assert_answers(runner.run(test), ref, flops)
                asked += runner._device_path.decided_on_host
    assert asked > 0  # the ties really reached the numpy decisions


def test_unguarded_torch_scores_would_flip_ties(monkeypatch):
    """Without the guard band the torch decisions differ from decide on tied samples: the tests above can fail."""
    monkeypatch.setattr(rules_mod, "SCORE_GUARD", 0.0)
    rng = np.random.default_rng(0)
    flops = np.array([1.0, 2.0, 3.5, 5.0])
    model = LogitsModel(4)
    flipped = 0
    for k in (3, 10, 100):
        z = tie_logits(rng, 400, 4, k)
        for i in range(40):  # tau exactly the numpy score of row i
            policy = build_policy("threshold", tau=float(confidence(z[i, 0]))).fit(z, None, flops)
            res = EarlyExitRunner(model, policy, flops, batch_size=400, decide="torch").run(z)
            flipped += int((res.exit != policy.decide(z)).sum())
    assert flipped > 0


def test_torch_score_close_to_numpy():
    rng = np.random.default_rng(3)
    for k in (1, 2, 10, 1000):
        z = (rng.standard_normal((200, k)) * 4).astype(np.float32)
        for score in ("max_prob", "entropy", "margin"):
            t = torch_confidence(torch.as_tensor(z), score).numpy()
            assert np.abs(t - confidence(z, score)).max() < 1e-13
            assert rules_mod.SCORE_GUARD > 1e3 * max(np.abs(t - confidence(z, score)).max(), 1e-16)


def test_policy_without_rule_is_asked():
    """A subclass that overrides exit_mask without a rule of its own is asked: its exit_mask decides, on either path."""
    from pcee.policies.threshold import ThresholdPolicy

    class Inverted(ThresholdPolicy):
        def exit_mask(self, level, logits):
            return ~super().exit_mask(level, logits)

    rng = np.random.default_rng(0)
    z = tie_logits(rng, 100, 3, 5)
    flops = np.array([1.0, 2.0, 3.0])
    policy = Inverted(tau=0.5).fit(z)
    assert isinstance(policy.exit_rule(), rules_mod.AskPolicy) and policy.exit_rule().on_device("cpu") is None
    ref = reference_columns(policy, z, "max_prob")
    for decide in ("numpy", "torch"):
        assert_answers(EarlyExitRunner(LogitsModel(3), policy, flops, batch_size=32, decide=decide).run(z), ref, flops)


# -- real models ----------------------------------------------------------------------------------


def sharpen(model):
    with torch.no_grad():  # sharper random heads, so that confidences spread and several exits answer
        for head in model.exit_heads:
            for linear in (m for m in head.modules() if isinstance(m, torch.nn.Linear)):
                for p in linear.parameters():
                    p.mul_(30.0)
    return model.eval()


MODELS = {
    "small-cnn": (lambda: build_model("small-cnn", widths=(8, 8, 16), downsample=(False, True, False)), (1, 8, 8)),
    "msdnet": (
        lambda: build_model("msdnet", "cifar10-anytime", n_blocks=3, n_channels=6, growth_rate=4, img_size=16),
        (3, 16, 16),
    ),
    "attach-exits": (
        lambda: build_model(
            "attach-exits",
            backbone="timm:resnet18",
            backbone_kwargs={"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]},
            img_size=32,
        ),
        (3, 32, 32),
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def real(request):
    build, shape = MODELS[request.param]
    torch.manual_seed(0)
    model = sharpen(build())
    rng = np.random.default_rng(0)
    x_val = rng.random((120, *shape), dtype=np.float32)
    x_test = rng.random((77, *shape), dtype=np.float32)
    val = forward_in_batches(model, x_val, len(x_val))
    full = forward_in_batches(model, x_test, len(x_test))  # the full forward, in one batch of >= min_rows samples
    flops = np.cumsum(np.arange(1, model.num_exits + 1, dtype=np.float64))
    return request.param, model, x_test, val, full, flops


def forward_in_batches(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate(
            [
                torch.stack(model(torch.as_tensor(x[s : s + batch_size])), 1).numpy()
                for s in range(0, len(x), batch_size)
            ]
        )


def survivor_counts(exits: np.ndarray, batch_size: int, num_exits: int) -> list[int]:
    """Samples still running at each non-first exit, batch by batch."""
    return [
        int((exits[s : s + batch_size] >= level).sum())
        for s in range(0, len(exits), batch_size)
        for level in range(1, num_exits)
    ]


def real_policies(val: np.ndarray, flops: np.ndarray):
    rng = np.random.default_rng(1)
    s0 = confidence(val[:, 0])
    labels = np.where(rng.random(len(val)) < s0, val[:, 0].argmax(1), val[:, -1].argmax(1))
    out = []
    for quantile in (0.3, 0.7):
        tau = float(np.quantile(s0, quantile))
        out.append(build_policy("threshold", tau=tau).fit(val, labels, flops))
    pcee = build_policy("pcee", min_count=1).fit(val, labels, flops)
    values = np.unique(pcee.map_values(val)[:, 0])
    for i in (len(values) // 3, 2 * len(values) // 3):
        out.append(build_policy("pcee", min_count=1, delta=float(values[i])).fit(val, labels, flops))
    out.append(build_policy("msdnet-budget", q=1.5).fit(val, labels, flops))
    return out


def test_real_models_bit_identical_to_full_forward_then_decide(real):
    """Batches of 32: the logits of a one-batch full forward (survivor sets padded to 16); batches of 5:
    those of a full forward in batches of 5 (below 16 rows the kernels depend on the row count)."""
    name, model, x, val, full, flops = real
    full5 = forward_in_batches(model, x, 5)
    several = small = 0
    for policy in real_policies(val, flops):
        score = policy.score
        ref = reference_columns(policy, full, score)
        several += len(np.unique(ref["exit"])) >= 2
        small += any(0 < n < 16 for n in survivor_counts(ref["exit"], 32, model.num_exits))
        for decide in ("numpy", "torch"):
            assert_answers(EarlyExitRunner(model, policy, flops, batch_size=32, decide=decide).run(x), ref, flops)
            res5 = EarlyExitRunner(model, policy, flops, batch_size=5, decide=decide).run(x)
            assert_answers(res5, reference_columns(policy, full5, score), flops)
    assert several >= 3, name  # non-trivial mixes
    assert small >= 1, name  # and survivor sets below 16 rows, padded


def test_regrouped_batches_run_full_and_stay_bit_identical(real, monkeypatch):
    """regroup > 1: batches run together exit by exit, and the survivors of the batches that lost samples
    are regrouped into full batches, on the host (numpy decisions) and on the device (torch decisions);
    the answers are those of the full forward in the same batches. A last batch under min_rows rows runs
    on its own (the full forward ran it on those few rows)."""
    name, model, x, val, full, flops = real
    bsz = 24
    ref_logits = forward_in_batches(model, x, bsz)  # 77 rows: three batches of 24, one of 5
    rows_seen = spy_rows(monkeypatch, model)
    fewer_calls = 0
    policies = real_policies(val, flops)
    for policy, decide in [(p, "numpy") for p in policies] + [(policies[1], "torch"), (policies[2], "torch")]:
        ref = reference_columns(policy, ref_logits, policy.score)
        for regroup in (1, 2, 3, 100):
            rows_seen.clear()
            result = EarlyExitRunner(model, policy, flops, batch_size=bsz, regroup=regroup, decide=decide).run(x)
            assert_answers(result, ref, flops)
            if regroup < 3:
                continue
            # the three full batches run as one window: at each exit, full batches of their survivors and
            # one remainder (padded up to min_rows = 16); then the 5-row batch's survivors on their own
            for level in range(1, model.num_exits):
                calls = [n for k, n in rows_seen if k == level]
                n_alive = int((ref["exit"][:72] >= level).sum())
                want = [bsz] * (n_alive // bsz) + ([max(n_alive % bsz, 16)] if n_alive % bsz else [])
                alone = int((ref["exit"][72:] >= level).sum())
                assert calls == want + ([max(alone, 5)] if alone else []), (name, level, calls, n_alive)
                batch_by_batch = sum(int((ref["exit"][s : s + bsz] >= level).sum()) > 0 for s in range(0, 72, bsz))
                fewer_calls += len(want) < batch_by_batch
    assert fewer_calls, name  # some exit ran fewer, fuller batches than batch by batch would


def test_gather_states_copies_the_rows_of_each_part_in_order():
    from pcee.models.base import gather_states, index_state

    rng = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 3, 2, generator=rng), torch.rand(4, 3, 2, generator=rng)
    ia, ib = torch.tensor([4, 0, 2]), torch.tensor([1])
    want = torch.cat([a[ia], b[ib]])
    assert torch.equal(gather_states([(a, ia), (b, ib)]), want)
    nested = gather_states([((a, [a[:, 0], None]), ia), ((b, [b[:, 0], None]), ib)])
    assert isinstance(nested, tuple) and torch.equal(nested[0], want)
    assert torch.equal(nested[1][0], torch.cat([a[ia, 0], b[ib, 0]])) and nested[1][1] is None
    cl = [t.unsqueeze(-1).contiguous(memory_format=torch.channels_last) for t in (a, b)]
    got = gather_states([(cl[0], ia), (cl[1], ib)])
    assert torch.equal(got, torch.cat([index_state(cl[0], ia), index_state(cl[1], ib)]))
    with pytest.raises(ValueError, match="at least one part"):
        gather_states([])
    with pytest.raises(TypeError, match="one structure"):
        gather_states([(a, ia), ((b,), ib)])
    with pytest.raises(TypeError, match="one structure"):
        gather_states([((a,), ia), (b, ib)])


def test_run_all_exits_equals_full_forward(real):
    _, model, x, val, full, flops = real
    policy = real_policies(val, flops)[0]
    shadow = EarlyExitRunner(model, policy, flops, batch_size=32).run_all_exits(x)
    np.testing.assert_array_equal(shadow.logits, full)
    np.testing.assert_array_equal(shadow.confidences, confidence(full, "max_prob"))
    np.testing.assert_array_equal(
        EarlyExitRunner(model, policy, flops, batch_size=5).run_all_exits(x).logits, forward_in_batches(model, x, 5)
    )


def test_min_rows_padding_is_what_keeps_small_survivor_sets_exact(real):
    """Padded survivor sets give the full forward's logits; unpadded ones only have to be close."""
    name, model, x, val, full, flops = real
    rows = np.arange(len(x))
    for policy in real_policies(val, flops):
        padded = EarlyExitRunner(model, policy, flops, batch_size=64).run(x)
        np.testing.assert_array_equal(padded.logits, full[rows, padded.exit])
        bare = EarlyExitRunner(model, policy, flops, batch_size=64, min_rows=0).run(x)
        np.testing.assert_allclose(bare.logits, full[rows, bare.exit], rtol=1e-4, atol=1e-4)


def test_opt_in_switches_are_close_not_promised_identical(real):
    name, model, x, val, full, flops = real
    policy = real_policies(val, flops)[2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = np.arange(len(x))
    for kwargs in ({"fuse_bn": True}, {"channels_last": True}, {"fuse_bn": True, "channels_last": True}):
        runner = EarlyExitRunner(model, policy, flops, batch_size=32, **kwargs)
        assert not runner.bit_identical and runner.exec_model is not model
        res = runner.run(x)
        np.testing.assert_allclose(res.logits, full[rows, res.exit], rtol=1e-3, atol=1e-3)
        # self-consistent: the transformed model's own full forward, then decide
        own = runner.run_all_exits(x).logits
        np.testing.assert_array_equal(res.exit, policy.decide(own))
        np.testing.assert_array_equal(res.logits, own[rows, res.exit])
    assert EarlyExitRunner(model, policy, flops).bit_identical
    for key, value in model.state_dict().items():  # the caller's model is left as it was
        assert torch.equal(value, before[key]), key


def test_fuse_conv_bn_folds_every_pair():
    for name in ("small-cnn", "msdnet", "attach-exits"):
        torch.manual_seed(0)
        model = MODELS[name][0]().eval()
        n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert fuse_conv_bn(model) == n_bn, name  # every BN follows a conv in these models
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_bn(build_model("small-cnn").train())


def test_runner_switch_validation():
    model, policy, flops = LogitsModel(2), build_policy("threshold"), np.ones(2)
    with pytest.raises(ValueError, match="decide"):
        EarlyExitRunner(model, policy, flops, decide="gpu")
    assert EarlyExitRunner(model, policy, flops).decide == "numpy"  # auto, on CPU
    with pytest.raises(ValueError, match="min_rows"):
        EarlyExitRunner(model, policy, flops, min_rows=-1)
    with pytest.raises(ValueError, match="regroup must be >= 1"):
        EarlyExitRunner(model, policy, flops, regroup=0)


def test_empty_input():
    policy = build_policy("threshold").fit(np.zeros((4, 2, 3), np.float32))
    res = EarlyExitRunner(LogitsModel(2), policy, np.ones(2)).run(np.zeros((0, 2, 3), np.float32))
    assert len(res) == 0 and res.confidences.shape == (0, 2)


@pytest.mark.slow
def test_compile_switch_runs_and_stays_close():
    """torch.compile (inductor, dynamic batch) of each segment: not promised bit-identical, only close."""
    torch.manual_seed(0)
    model = sharpen(MODELS["small-cnn"][0]())
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    with torch.inference_mode():
        full = torch.stack(model(torch.as_tensor(x)), 1).numpy()
    flops = np.array([1.0, 2.0, 3.0])
    policy = build_policy("threshold", tau=float(np.median(confidence(full[:, 0])))).fit(full, None, flops)
    runner = EarlyExitRunner(model, policy, flops, batch_size=32, compile=True)
    assert not runner.bit_identical
    runner.warmup(x[:16])
    res = runner.run(x)
    rows = np.arange(len(x))
    np.testing.assert_allclose(res.logits, full[rows, res.exit], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(runner.run_all_exits(x).logits, full, rtol=1e-4, atol=1e-4)


def test_run_uses_eval_mode_and_restores_the_callers_mode(monkeypatch):
    """A model in training mode runs in eval mode (dropout off, BN on running stats) and gets its
    mode back; a model already in eval mode is not toggled at all (the serving hot path)."""
    torch.manual_seed(0)
    model = build_model("small-cnn")
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    model.eval()
    with torch.inference_mode():
        val = torch.stack(model(torch.as_tensor(x)), dim=1).numpy()
    flops = np.arange(1.0, model.num_exits + 1)
    policy = build_policy("threshold", tau=0.5).fit(val, val[:, -1].argmax(1), flops)
    runner = EarlyExitRunner(model, policy, flops)
    ref = runner.run(x)
    model.train()
    model.exit_heads[0].eval()  # a mixed state comes back as the caller left it
    before = {name: m.training for name, m in model.named_modules()}
    np.testing.assert_array_equal(runner.run(x).logits, ref.logits)  # eval mode inside the run
    assert {name: m.training for name, m in model.named_modules()} == before
    model.eval()
    calls = []
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: calls.append(mode) or self)
    runner.run(x)
    runner.run_all_exits(x)
    assert calls == []  # nothing toggled: every module was in eval mode already

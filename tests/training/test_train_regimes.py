"""The five regimes on the real small CNN and digits, and the properties that define them."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from pcee.training import TrainConfig, compute_outputs, exit_accuracies, train_model
from pcee.training.config import REGIMES
from pcee.training.regimes import ExitsForward, Phase, apply_phase, build_phases, detach_state, phase_loss

# Short runs. The small CNN's first exit (one 16-channel conv, global average pool, linear) is weak
# by design, and with a frozen backbone (disjoint, distill) its head is only a linear map of 16
# pooled features, so "beats chance" is a significance test rather than a high bar.
SHORT = dict(epochs=10, batch_size=64, lr=0.1)


def _above_chance(acc: float, n: int, num_classes: int, z: float = 4.0) -> bool:
    """Accuracy more than ``z`` binomial standard errors above chance (one-sided p < 4e-5 at z=4)."""
    p = 1.0 / num_classes
    return acc > p + z * np.sqrt(p * (1 - p) / n)


def _backbone_and_heads(model):
    head_names = {f"exit_heads.{name}" for name, _ in model.exit_heads.named_parameters()}
    head_names |= {f"exit_heads.{name}" for name, _ in model.exit_heads.named_buffers()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    backbone = {k: v for k, v in state.items() if k not in head_names}
    heads = {k: v for k, v in state.items() if k in head_names}
    return backbone, heads


@pytest.mark.parametrize("regime", REGIMES)
def test_regime_beats_chance_at_every_exit(regime, digits, small_cnn):
    model = small_cnn()
    history = train_model(model, digits, TrainConfig(regime=regime, **SHORT), progress=False)
    assert len(history) == SHORT["epochs"]
    assert all(len(h["val_accuracy"]) == model.num_exits for h in history)
    out = compute_outputs(model, digits.test, np.arange(1, model.num_exits + 1, dtype=float))
    acc = exit_accuracies(out.logits, out.labels)
    n = len(digits.test.y)
    assert all(_above_chance(a, n, digits.num_classes) for a in acc), f"{regime}: per-exit test accuracy {acc}"
    assert acc[-1] > 0.9, f"{regime}: final exit {acc[-1]}"
    assert all(p.requires_grad for p in model.parameters()), "training must leave the model unfrozen"


def test_sweet_gradients_stop_at_segment_boundaries(digits, small_cnn):
    model = small_cnn()
    model.train()
    L = model.num_exits
    x = torch.as_tensor(digits.train.x[:32])
    y = torch.as_tensor(digits.train.y[:32])
    params = dict(model.named_parameters())

    # which parameters belong to segment k: those reached from exit k's output with a detached input
    segment_of = {}
    state = model.initial_state(x)
    for k in range(L):
        state_in = state if k == 0 else detach_state(state)
        state, z = model.forward_segment(k, state_in)
        grads = torch.autograd.grad(z.sum(), list(params.values()), allow_unused=True, retain_graph=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None and name not in segment_of:
                segment_of[name] = k
    assert set(segment_of.values()) == set(range(L))

    logits = ExitsForward(model, detach_segments=True)(x)
    for exit_l in range(L):
        loss = torch.nn.functional.cross_entropy(logits[exit_l], y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
        for (name, _), g in zip(params.items(), grads):
            seg = segment_of.get(name)
            if seg is not None and seg < exit_l:
                assert g is None or torch.count_nonzero(g) == 0, f"exit {exit_l} loss leaks into segment {seg} ({name})"
        own = [g for (name, _), g in zip(params.items(), grads) if segment_of.get(name) == exit_l and g is not None]
        assert own and any(torch.count_nonzero(g) > 0 for g in own), f"exit {exit_l} loss must train segment {exit_l}"

    # without the detach (joint), a later exit's loss does reach earlier segments: the test can fail
    joint_logits = ExitsForward(model, detach_segments=False)(x)
    loss = torch.nn.functional.cross_entropy(joint_logits[L - 1], y)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    assert any(
        g is not None and torch.count_nonzero(g) > 0
        for (name, _), g in zip(params.items(), grads)
        if segment_of.get(name) == 0
    )


def test_disjoint_phase2_leaves_backbone_weights_and_buffers_unchanged(digits, small_cnn):
    model = small_cnn()
    # phase 1 only (backbone + final head), so BatchNorm statistics are real, not initial values
    train_model(model, digits, TrainConfig(regime="disjoint", epochs=2, phase1_fraction=1.0), progress=False)
    backbone_before, heads_before = _backbone_and_heads(model)
    # phase 2 only
    train_model(model, digits, TrainConfig(regime="disjoint", epochs=2, phase1_fraction=0.0), progress=False)
    backbone_after, heads_after = _backbone_and_heads(model)
    assert backbone_before.keys() == backbone_after.keys() and backbone_before
    for k in backbone_before:
        assert torch.equal(backbone_before[k], backbone_after[k]), f"backbone tensor {k} changed in phase 2"
    L = model.num_exits
    changed = {int(k.split(".")[1]) for k in heads_before if not torch.equal(heads_before[k], heads_after[k])}
    assert changed == set(range(L - 1)), f"phase 2 must train heads 0..L-2 only, changed {sorted(changed)}"


def test_disjoint_full_run_backbone_fixed_after_phase1(digits, small_cnn):
    """The same through one two-phase run: snapshot at the phase boundary via a hook on apply_phase."""
    import pcee.training.trainer as trainer

    model = small_cnn()
    snapshots = []
    original = trainer.apply_phase

    def spy(m, phase):
        if phase.name == "heads" and not snapshots:
            snapshots.append(_backbone_and_heads(m)[0])
        return original(m, phase)

    trainer.apply_phase = spy
    try:
        train_model(model, digits, TrainConfig(regime="disjoint", epochs=4), progress=False)
    finally:
        trainer.apply_phase = original
    after = _backbone_and_heads(model)[0]
    assert snapshots and all(torch.equal(snapshots[0][k], after[k]) for k in after)


def test_distill_phase2_uses_no_labels(digits, small_cnn):
    model = small_cnn()
    train_model(model, digits, TrainConfig(regime="distill", epochs=2, phase1_fraction=1.0), progress=False)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    rng = np.random.default_rng(1)
    shuffled_train = dataclasses.replace(digits.train, y=rng.permutation(digits.train.y))
    assert not np.array_equal(shuffled_train.y, digits.train.y)
    shuffled = dataclasses.replace(digits, train=shuffled_train)
    phase2 = TrainConfig(regime="distill", epochs=2, phase1_fraction=0.0)
    train_model(a, digits, phase2, progress=False)
    train_model(b, shuffled, phase2, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and phase 2 did train the early heads
    s0 = model.state_dict()
    assert any(not torch.equal(s0[k], sa[k]) for k in s0 if k.startswith("exit_heads.0."))


def test_kl_loss_is_zero_when_heads_match_final():
    phase = Phase("distill", 1, False, (0, 1), (0, 1), loss_kind="kl")
    z = torch.randn(8, 10)
    assert phase_loss(phase, [z.clone(), z.clone(), z], None).item() == pytest.approx(0.0, abs=1e-6)
    assert phase_loss(phase, [torch.zeros(8, 10), z.clone(), z], None).item() > 0
    with pytest.raises(ValueError, match="needs labels"):
        phase_loss(Phase("joint", 1, True, (0,), (0,)), [z], None)


def test_apply_phase_freezes_and_sets_eval(small_cnn):
    model = small_cnn()
    L = model.num_exits
    phase = build_phases(TrainConfig(regime="disjoint", epochs=2), L)[1]
    trainable = apply_phase(model, phase)
    head_ids = {id(p) for i in range(L - 1) for p in model.exit_heads[i].parameters()}
    assert {id(p) for p in trainable} == head_ids
    assert all(not m.training for name, m in model.named_modules() if not name.startswith("exit_heads"))
    assert all(model.exit_heads[i].training for i in range(L - 1)) and not model.exit_heads[L - 1].training


def test_trainer_is_deterministic(digits, small_cnn):
    config = TrainConfig(regime="joint", epochs=1)
    a, b = small_cnn(seed=3), small_cnn(seed=3)
    train_model(a, digits, config, progress=False)
    train_model(b, digits, config, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

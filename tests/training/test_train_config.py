import pytest

from pcee.training.config import OPTIMIZERS, REGIMES, SCHEDULES, TrainConfig
from pcee.training.regimes import build_phases


@pytest.mark.parametrize(
    "field, valid",
    [("regime", REGIMES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)],
)
def test_unknown_names_list_the_valid_ones(field, valid):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{field: "bogus"})
    message = str(err.value)
    assert "bogus" in message
    for name in valid:
        assert name in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0.0},
        {"phase1_fraction": 1.5},
        {"weight_decay": -1.0},
        {"momentum": 1.0},
        {"step_milestones": (0.8, 0.2)},
        {"distill_temperature": 0.0},
    ],
)
def test_bad_values_fail(kwargs):
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)


def test_dict_round_trip_and_unknown_option():
    config = TrainConfig(regime="sweet", epochs=7, optimizer="adamw", lr=1e-3, schedule="step")
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="valid options"):
        TrainConfig.from_dict({"regime": "joint", "learning_rate": 0.1})


def test_phase_split():
    L = 4
    mixed = build_phases(TrainConfig(regime="mixed", epochs=10, phase1_fraction=0.3), L)
    assert [(p.name, p.epochs) for p in mixed] == [("backbone", 3), ("all", 7)]
    assert mixed[0].train_heads == (3,) and mixed[0].loss_exits == (3,) and mixed[0].train_backbone
    assert mixed[1].train_heads == (0, 1, 2, 3) and mixed[1].train_backbone

    disjoint = build_phases(TrainConfig(regime="disjoint", epochs=10), L)
    assert not disjoint[1].train_backbone and disjoint[1].train_heads == (0, 1, 2) and disjoint[1].uses_labels

    distill = build_phases(TrainConfig(regime="distill", epochs=10), L)
    assert distill[1].loss_kind == "kl" and not distill[1].uses_labels and not distill[1].train_backbone

    sweet = build_phases(TrainConfig(regime="sweet", epochs=5), L)
    assert len(sweet) == 1 and sweet[0].detach_segments and sweet[0].loss_exits == (0, 1, 2, 3)

    # fraction 0 or 1 drops the empty phase
    assert [p.name for p in build_phases(TrainConfig(regime="distill", epochs=4, phase1_fraction=0.0), L)] == [
        "distill"
    ]
    assert [p.name for p in build_phases(TrainConfig(regime="mixed", epochs=4, phase1_fraction=1.0), L)] == ["backbone"]

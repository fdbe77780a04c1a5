"""Training regimes for multi-exit networks (docs/architecture.md, after arXiv 2407.14320).

A regime is a list of phases. Each phase says which parameters train (the backbone — everything not
in ``model.exit_heads`` — and which heads), which exits' losses count, whether the loss is
cross-entropy on labels or KL to the final exit, and whether segment inputs are detached.

- ``joint``: one phase; backbone and all heads, loss = sum over exits of CE.
- ``disjoint``: phase 1 trains the backbone with the final head (CE on the final exit); phase 2
  freezes the backbone and the final head and trains heads 0..L-2 (sum of their CE).
- ``mixed``: phase 1 as ``disjoint``; phase 2 trains everything with the sum of CE over all exits.
- ``sweet`` (SWEET): one phase, sum of CE over exits, but each segment's input state is detached,
  so the layers between exit l-1 and l get gradient only from exit l's loss.
- ``distill``: phase 1 as ``disjoint``; phase 2 freezes the backbone and final head and trains
  heads 0..L-2 to match the final exit's softmax by KL (T^2-scaled); no labels are used.

A pretrained backbone (``attach-exits`` with weights from ``--backbone-weights``; the trainer passes
``backbone_frozen=True`` when ``model.backbone_pretrained``) changes one regime: ``disjoint`` becomes a
single phase ``heads`` that trains every head, the final one included (it is new too), on the sum of
their CE with the backbone frozen — only what is new trains. ``mixed`` still fine-tunes everything in
its phase 2 (its phase 1 trains the backbone with the final head); the other regimes are unchanged.

Frozen parts are kept in eval mode so BatchNorm running statistics (and dropout) do not move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pcee.models.base import MultiExitModel, State
from pcee.training.config import REGIMES, TrainConfig

LOSS_KINDS = ("ce", "kl")


@dataclass(frozen=True)
class Phase:
    """One stage of a regime."""

    name: str
    epochs: int
    train_backbone: bool
    train_heads: tuple[int, ...]  # 0-based exit indices whose heads get updated
    loss_exits: tuple[int, ...]  # exits whose loss is summed
    loss_kind: str = "ce"  # "ce" (labels) or "kl" (to the final exit's softmax; labels unused)
    detach_segments: bool = False

    @property
    def uses_labels(self) -> bool:
        return self.loss_kind == "ce"


def build_phases(config: TrainConfig, num_exits: int, backbone_frozen: bool = False) -> list[Phase]:
    """The phases of ``config.regime`` for a model with ``num_exits`` exits (empty phases dropped).

    ``backbone_frozen``: the backbone is pretrained, so ``disjoint`` trains every head in one phase
    with the backbone frozen (see the module docstring).
    """
    if config.regime not in REGIMES:
        raise ValueError(f"unknown regime {config.regime!r}; valid regimes: {', '.join(REGIMES)}")
    L = num_exits
    every = tuple(range(L))
    early = tuple(range(L - 1))
    final = (L - 1,)
    if config.regime == "joint":
        phases = [Phase("joint", config.epochs, True, every, every)]
    elif config.regime == "disjoint" and backbone_frozen:
        phases = [Phase("heads", config.epochs, False, every, every)]
    elif config.regime == "sweet":
        phases = [Phase("sweet", config.epochs, True, every, every, detach_segments=True)]
    else:
        e1 = int(round(config.epochs * config.phase1_fraction))
        e2 = config.epochs - e1
        phase1 = Phase("backbone", e1, True, final, final)
        if config.regime == "disjoint":
            phase2 = Phase("heads", e2, False, early, early)
        elif config.regime == "mixed":
            phase2 = Phase("all", e2, True, every, every)
        else:  # distill
            phase2 = Phase("distill", e2, False, early, early, loss_kind="kl")
        phases = [phase1, phase2]
    return [p for p in phases if p.epochs > 0 and (p.train_backbone or p.train_heads) and p.loss_exits]


def head_parameter_ids(model: MultiExitModel) -> list[set[int]]:
    """``id`` of every parameter of each exit head (the rest of the model is the backbone)."""
    heads = getattr(model, "exit_heads", None)
    if not isinstance(heads, nn.ModuleList) or len(heads) != model.num_exits:
        raise ValueError(
            f"model {type(model).__name__} needs an `exit_heads` nn.ModuleList with one head per exit "
            f"({model.num_exits}) for the training regimes to tell heads from backbone"
        )
    return [{id(p) for p in head.parameters()} for head in heads]


def apply_phase(model: MultiExitModel, phase: Phase) -> list[nn.Parameter]:
    """Set ``requires_grad`` and train/eval mode for ``phase``; return the trainable parameters.

    Frozen parts go to eval mode so their BatchNorm running statistics stay fixed.
    """
    head_ids = head_parameter_ids(model)
    trainable_ids = set().union(*(head_ids[i] for i in phase.train_heads)) if phase.train_heads else set()
    all_head_ids = set().union(*head_ids)
    for p in model.parameters():
        is_head = id(p) in all_head_ids
        p.requires_grad_(id(p) in trainable_ids or (phase.train_backbone and not is_head))
    model.train(phase.train_backbone)  # sets every submodule, heads included
    for i, head in enumerate(cast(nn.ModuleList, model.exit_heads)):  # checked by head_parameter_ids
        head.train(i in phase.train_heads)
    return [p for p in model.parameters() if p.requires_grad]


def unfreeze(model: MultiExitModel) -> None:
    """Undo :func:`apply_phase`: every parameter trainable again."""
    for p in model.parameters():
        p.requires_grad_(True)


def detach_state(state: State) -> State:
    """Detach every tensor of a (nested) state, cutting the gradient path to earlier segments."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(s) for s in state)
    if state is None:
        return None
    raise TypeError(f"unsupported state element of type {type(state).__name__}")


class ExitsForward(nn.Module):
    """All exits' logits, optionally with each segment's input detached (SWEET).

    A module (not a function) so DistributedDataParallel can wrap it: DDP's gradient hooks are only
    armed by calls through the wrapper's ``forward``.
    """

    def __init__(self, model: MultiExitModel, detach_segments: bool = False) -> None:
        super().__init__()
        self.model = model
        self.detach_segments = detach_segments

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        state = self.model.initial_state(x)
        logits = []
        for k in range(self.model.num_exits):
            if self.detach_segments and k > 0:
                state = detach_state(state)
            state, z = self.model.forward_segment(k, state)
            logits.append(z)  # (B, K)
        return logits


def phase_loss(
    phase: Phase, logits: list[torch.Tensor], y: torch.Tensor | None, temperature: float = 1.0
) -> torch.Tensor:
    """Sum over ``phase.loss_exits`` of CE(labels) or T^2 * KL(final softmax || exit softmax)."""
    if phase.loss_kind == "ce":
        if y is None:
            raise ValueError(f"phase {phase.name!r} needs labels")
        # sum()'s stub adds int 0 for an empty sum; build_phases keeps only phases with loss exits
        return cast(torch.Tensor, sum(F.cross_entropy(logits[i], y) for i in phase.loss_exits))
    if phase.loss_kind == "kl":
        t = temperature
        teacher = F.log_softmax(logits[-1].detach() / t, dim=1)  # (B, K), fixed target
        return cast(
            torch.Tensor,
            sum(
                F.kl_div(F.log_softmax(logits[i] / t, dim=1), teacher, reduction="batchmean", log_target=True) * t * t
                for i in phase.loss_exits
            ),
        )
    raise ValueError(f"unknown loss kind {phase.loss_kind!r}; valid: {', '.join(LOSS_KINDS)}")

"""Check that a model keeps the multi-exit contract (docs/models.md) before pcee trains or serves it.

``check_model(model, input_shape)`` runs a small random batch through the model in eval mode and
raises :class:`ContractError` (a ``ValueError``) naming the method that broke the contract and the
shape or type it got:

- ``num_exits`` is a positive int;
- ``initial_state(x)`` and every ``forward_segment(k, state)`` leave a state of tensors (or nested
  lists/tuples of tensors, or None) with the batch on dim 0, so :func:`~pcee.models.base.index_state`
  can select survivors;
- ``forward_segment(k, state)`` returns ``(state, logits)`` with logits ``(B, K)``, the same K at
  every exit;
- ``forward(x)`` returns the same L logits as running the segments one by one;
- compacting the state after exit 0 (``index_state``) leaves the survivors' later logits unchanged;
- ``exit_heads`` (what the training regimes freeze and train, docs/models.md) is an
  ``nn.ModuleList`` with one head per exit, each with parameters, no parameter shared by two heads.

:func:`check_model_static` is the part that needs no input (num_exits, the methods, exit_heads).
Neither moves BatchNorm statistics, leaves gradients, or consumes the global random generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pcee.models.base import index_state

__all__ = ["ContractError", "check_model", "check_model_static"]

_RTOL, _ATOL = 1e-4, 1e-5


class ContractError(ValueError):
    """A model breaks the multi-exit contract; the message names the method and what it returned."""


def _name(model: Any) -> str:
    return getattr(model, "model_name", "") or type(model).__name__


def _fail(model: Any, message: str) -> ContractError:
    return ContractError(f"model {_name(model)!r} breaks the multi-exit contract (docs/models.md): {message}")


def _num_exits(model: Any) -> int:
    try:
        value = model.num_exits
    except Exception as err:  # noqa: BLE001 - any failure is the contract's concern
        raise _fail(model, f"num_exits raised {type(err).__name__}: {err}") from err
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(model, f"num_exits must be a positive int, got {value!r} ({type(value).__name__})")
    return value


def check_model_static(model: Any, require_exit_heads: bool = True) -> int:
    """The checks that need no input; returns ``num_exits``. Raises :class:`ContractError`."""
    if not isinstance(model, nn.Module):
        raise _fail(model, f"a multi-exit model is a torch.nn.Module, got {type(model).__name__}")
    num_exits = _num_exits(model)
    for method in ("initial_state", "forward_segment"):
        if not callable(getattr(model, method, None)):
            raise _fail(model, f"{method} is missing (subclass pcee.models.base.MultiExitModel)")
    heads = getattr(model, "exit_heads", None)
    if heads is None:
        if require_exit_heads:
            raise _fail(
                model,
                "exit_heads is missing: the training regimes need an nn.ModuleList with one head per exit "
                f"({num_exits}) to tell the heads from the backbone",
            )
        return num_exits
    if not isinstance(heads, nn.ModuleList) or len(heads) != num_exits:
        got = f"an nn.ModuleList of {len(heads)}" if isinstance(heads, nn.ModuleList) else type(heads).__name__
        raise _fail(model, f"exit_heads must be an nn.ModuleList with one head per exit ({num_exits}), got {got}")
    ids = [{id(p) for p in head.parameters()} for head in heads]
    for k, head_ids in enumerate(ids):
        if not head_ids:
            raise _fail(model, f"exit_heads[{k}] has no parameters (each exit's head must be trainable)")
    if sum(map(len, ids)) != len(set().union(*ids)):
        raise _fail(model, "a parameter is shared by two exit_heads (the regimes freeze and train heads separately)")
    return num_exits


def _describe(state: Any) -> str:
    """A short description of a state: shapes of its tensors, types of anything else."""
    if isinstance(state, torch.Tensor):
        return f"tensor{tuple(state.shape)}"
    if isinstance(state, (list, tuple)):
        inner = ", ".join(_describe(s) for s in state)
        return f"[{inner}]" if isinstance(state, list) else f"({inner}{',' if len(state) == 1 else ''})"
    if state is None:
        return "None"
    return type(state).__name__


def _check_state(model: Any, where: str, state: Any, batch: int) -> None:
    """Every tensor of ``state`` has the batch on dim 0; nothing but tensors, lists/tuples and None."""

    def walk(s: Any) -> bool:
        if isinstance(s, torch.Tensor):
            return s.dim() >= 1 and s.shape[0] == batch
        if isinstance(s, (list, tuple)):
            return all(walk(t) for t in s)
        return s is None

    if not walk(state):
        raise _fail(
            model,
            f"{where} returned a state {_describe(state)}: every state tensor must have the batch ({batch}) "
            "on dim 0, inside at most lists/tuples (or None), so index_state can keep the surviving samples",
        )


def _segment(model: Any, k: int, state: Any, batch: int, num_classes: int | None) -> tuple[Any, torch.Tensor]:
    where = f"forward_segment({k}, state)"
    try:
        out = model.forward_segment(k, state)
    except ContractError:
        raise
    except Exception as err:  # noqa: BLE001
        raise _fail(model, f"{where} raised {type(err).__name__}: {err} (state {_describe(state)})") from err
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise _fail(model, f"{where} must return (state, logits), got {_describe(out)}")
    new_state, logits = out
    if not isinstance(logits, torch.Tensor):
        raise _fail(model, f"{where} returned logits of type {type(logits).__name__}; expected a tensor (B, K)")
    expected = f"({batch}, {num_classes})" if num_classes is not None else f"({batch}, K)"
    if logits.dim() != 2 or logits.shape[0] != batch or (num_classes is not None and logits.shape[1] != num_classes):
        same = " (the same K as exit 0)" if num_classes is not None and k > 0 else ""
        raise _fail(model, f"{where} returned logits of shape {tuple(logits.shape)}; expected {expected}{same}")
    if not torch.isfinite(logits).all():
        raise _fail(model, f"{where} returned non-finite logits")
    return new_state, logits


def check_model(model: Any, input_shape: Sequence[int], batch: int = 3, require_exit_heads: bool = True) -> None:
    """Raise :class:`ContractError` if ``model`` breaks the multi-exit contract on inputs ``(batch, *input_shape)``.

    Runs in eval mode without gradients (the model's mode is restored) on a seeded random batch in
    [0, 1); ``batch`` >= 2 also checks compaction. ``require_exit_heads=False`` skips the
    ``exit_heads`` requirement (a model that is never trained by pcee).
    """
    num_exits = check_model_static(model, require_exit_heads=require_exit_heads)
    shape = tuple(int(s) for s in input_shape)
    batch = int(batch)
    if batch < 1 or not shape or min(shape) < 1:
        raise ValueError(f"check_model needs batch >= 1 and a positive input_shape, got batch {batch}, shape {shape}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _check_run(model, x, num_exits, batch)
    finally:
        model.train(was_training)


def _check_run(model: Any, x: torch.Tensor, num_exits: int, batch: int) -> None:
    try:
        state = model.initial_state(x)
    except Exception as err:  # noqa: BLE001
        raise _fail(model, f"initial_state(x) raised {type(err).__name__}: {err} (x {tuple(x.shape)})") from err
    _check_state(model, f"initial_state(x) with x {tuple(x.shape)}", state, batch)
    segment_logits: list[torch.Tensor] = []
    states = []
    num_classes = None
    for k in range(num_exits):
        state, z = _segment(model, k, state, batch, num_classes)
        num_classes = z.shape[1]
        if k < num_exits - 1:  # the last segment's state is never used
            _check_state(model, f"forward_segment({k}, state)", state, batch)
        states.append(state)
        segment_logits.append(z)

    # forward(x) == the segments one by one
    try:
        full = model(x)
    except NotImplementedError as err:
        raise _fail(
            model, "forward(x) is missing: subclass pcee.models.base.MultiExitModel (its forward runs the segments)"
        ) from err
    except Exception as err:  # noqa: BLE001
        raise _fail(model, f"forward(x) raised {type(err).__name__}: {err} (x {tuple(x.shape)})") from err
    if (
        not isinstance(full, (list, tuple))
        or len(full) != num_exits
        or not all(isinstance(z, torch.Tensor) for z in full)
    ):
        raise _fail(
            model, f"forward(x) must return a list of num_exits ({num_exits}) logits tensors, got {_describe(full)}"
        )
    for k, (a, b) in enumerate(zip(full, segment_logits, strict=True)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=_RTOL, atol=_ATOL):
            raise _fail(
                model,
                f"forward(x)[{k}] (shape {tuple(a.shape)}) differs from forward_segment({k}, state) "
                f"(shape {tuple(b.shape)}) run segment by segment",
            )

    # compaction: drop sample 1 after exit 0; the survivors' later logits must not change
    if batch < 2 or num_exits < 2:
        return
    keep = torch.ones(batch, dtype=torch.bool, device=x.device)
    keep[1] = False
    try:
        state = index_state(states[0], keep)
    except Exception as err:  # noqa: BLE001
        raise _fail(
            model,
            f"index_state on the state of forward_segment(0, state), {_describe(states[0])}, raised {type(err).__name__}: {err}",
        ) from err
    survivors = int(keep.sum())
    for k in range(1, num_exits):
        state, z = _segment(model, k, state, survivors, num_classes)
        if not torch.allclose(z, segment_logits[k][keep], rtol=_RTOL, atol=_ATOL):
            raise _fail(
                model,
                f"forward_segment({k}, state) gives the surviving samples different logits after the state was "
                "compacted with index_state (a sample's logits must not depend on the other samples in the batch)",
            )
        if k < num_exits - 1:
            _check_state(model, f"forward_segment({k}, state) after compaction", state, survivors)

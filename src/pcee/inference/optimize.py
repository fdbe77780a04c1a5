"""Opt-in inference transforms for :class:`~pcee.inference.runner.EarlyExitRunner`. None is bit-identical.

- :func:`fuse_conv_bn`: folds every eval-mode ``BatchNorm2d`` into the ``Conv2d`` that feeds only it
  (``torch.nn.utils.fusion.fuse_conv_bn_eval``), found by tracing submodules with ``torch.fx``.
  The folded weight ``w * gamma / sqrt(var + eps)`` is rounded once more, so logits move by float
  rounding (about 1e-7 relative to the logit scale on the models here).
- :func:`to_channels_last`: parameters and (in the runner) inputs in ``torch.channels_last``; oneDNN
  then runs other convolution kernels, which sum in another order (logits move by float rounding).
- :func:`compile_segments`: ``torch.compile`` of each segment (inductor, dynamic batch size); the
  generated kernels fuse and reorder arithmetic. Compiling happens on the first call of each segment.

The transforms work on a copy (:func:`prepare_model`): the caller's model is left as it is.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pcee.inference.graphs import Segment
from pcee.models.base import MultiExitModel


def _conv_bn_pairs(root: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) qualified names, relative to ``root``, where a Conv2d's output feeds only a BatchNorm2d."""
    try:
        graph = fx.symbolic_trace(root).graph
    except Exception:  # not traceable as a whole (data-dependent control flow, list inputs): its children are tried
        return []
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        prev = node.args[0]
        if prev.op != "call_module" or len(prev.users) != 1:
            continue
        conv, bn = root.get_submodule(str(prev.target)), root.get_submodule(str(node.target))
        if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
            pairs.append((str(prev.target), str(node.target)))
    return pairs


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold eval-mode BatchNorm2d layers into the convolutions before them, in place; returns how many.

    Every submodule is traced with ``torch.fx`` (the model itself is not: its segments are called one
    by one); a BN whose input is a Conv2d used nowhere else is folded into it and replaced by an
    ``nn.Identity``. Modules that do not trace are skipped (their traceable children are still tried).
    Each module is used as traced, so a conv called twice in one forward is not folded.
    """
    if model.training:
        raise ValueError("fuse_conv_bn folds running statistics: call model.eval() first")
    done: set[int] = set()
    count = 0
    for sub in list(model.modules()):
        if sub is model or isinstance(sub, (nn.Conv2d, nn.BatchNorm2d)):
            continue
        for conv_name, bn_name in _conv_bn_pairs(sub):
            conv, bn = sub.get_submodule(conv_name), sub.get_submodule(bn_name)
            if id(bn) in done or id(conv) in done:
                continue
            fused = fuse_conv_bn_eval(conv, bn)  # type: ignore[arg-type]  # get_submodule returns nn.Module
            _set_submodule(sub, conv_name, fused)
            _set_submodule(sub, bn_name, nn.Identity())
            done.update((id(bn), id(conv), id(fused)))
            count += 1
    return count


def to_channels_last(model: nn.Module) -> nn.Module:
    """Parameters and buffers of 4-D shape in ``torch.channels_last`` (in place; returns the model)."""
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # the stub misses memory_format


def prepare_model(model: MultiExitModel, *, fuse_bn: bool = False, channels_last: bool = False) -> MultiExitModel:
    """The model to execute: ``model`` itself when no transform is asked for, else a transformed eval-mode copy."""
    if not (fuse_bn or channels_last):
        return model
    out = copy.deepcopy(model).eval()
    if fuse_bn:
        fuse_conv_bn(out)
    if channels_last:
        to_channels_last(out)
    return out


def compile_segments(model: MultiExitModel, **compile_kwargs) -> list[Segment]:
    """One ``torch.compile``d callable per segment (``dynamic=True`` unless given: the batch shrinks as samples leave)."""
    compile_kwargs.setdefault("dynamic", True)
    return [
        torch.compile(functools.partial(model.forward_segment, k), **compile_kwargs) for k in range(model.num_exits)
    ]

"""Cumulative per-exit cost of a multi-exit model, measured on one sample.

``measure_exit_flops`` is the project's cost F_l (docs/architecture.md): ``torch.utils.flop_counter``
FLOPs of backbone segments 1..l plus exit heads 1..l, measured segment by segment exactly as the
early-exit runner executes them. FlopCounterMode counts a multiply-add as 2 FLOPs (convolutions,
matmuls, attention) and ignores element-wise ops, so MACs = FLOPs / 2.

``port_op_count`` reproduces the op-count convention of the MSDNet PyTorch port's ``op_counter.py``
(the convention of docs/architecture.md's MSDNet reference): conv and linear multiply-adds, plus each linear
bias, plus one op per ReLU output and per pooled input element; BatchNorm costs 0. It is derived from
FlopCounterMode MACs and forward hooks on ReLU / pooling / linear modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pcee.models.base import MultiExitModel

# Cumulative costs published for (model, preset), in the port's convention, MFLOPs (docs/architecture.md).
REFERENCE_MFLOPS: dict[tuple[str, str], tuple[float, ...]] = {
    ("msdnet", "cifar100-anytime"): (15.14, 25.51, 37.10, 46.33, 57.34, 66.96, 75.94),
}

_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) of one sample, got {tuple(input_shape)}")
    return shape


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _segment_costs(model: MultiExitModel, input_shape: Sequence[int], extra_ops: bool) -> np.ndarray:
    """Per-segment (not cumulative) FLOPs, or port-convention ops if ``extra_ops``."""
    shape = _check_shape(input_shape)
    param = next(model.parameters(), None)
    x = torch.zeros((1, *shape), device=param.device if param is not None else "cpu")
    counter = [0]

    def relu_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        counter[0] += output.numel()

    def pool_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        counter[0] += args[0].numel()

    def linear_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if module.bias is not None:  # the port adds one op per bias; FlopCounterMode counts none
            counter[0] += output.numel()

    handles = []
    if extra_ops:
        for m in model.modules():
            if isinstance(m, nn.ReLU):
                handles.append(m.register_forward_hook(relu_hook))
            elif isinstance(m, _POOLS):
                handles.append(m.register_forward_hook(pool_hook))
            elif isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
    costs = []
    try:
        with _eval_no_grad(model):
            state = model.initial_state(x)
            for k in range(model.num_exits):
                counter[0] = 0
                with FlopCounterMode(display=False) as fc:
                    state, _ = model.forward_segment(k, state)
                flops = fc.get_total_flops()
                costs.append(flops / 2 + counter[0] if extra_ops else flops)
    finally:
        for h in handles:
            h.remove()
    return np.asarray(costs, dtype=np.float64)


def measure_exit_flops(model: MultiExitModel, input_shape: Sequence[int]) -> np.ndarray:
    """Cumulative FLOPs F_l (L,) of exits 1..L for one sample of shape ``input_shape`` = (C, H, W).

    F_l = FlopCounterMode FLOPs of segments 1..l (backbone and the heads evaluated on the way);
    MACs are F / 2.
    """
    return np.cumsum(_segment_costs(model, input_shape, extra_ops=False))


def port_op_count(model: MultiExitModel, input_shape: Sequence[int]) -> np.ndarray:
    """Cumulative ops (L,) in the MSDNet port's convention (see module docstring), for one sample."""
    return np.cumsum(_segment_costs(model, input_shape, extra_ops=True))


def reference_mflops(model_name: str, preset: str | None) -> np.ndarray | None:
    """Published cumulative MFLOPs (port convention) for ``(model_name, preset)``, or None if unknown."""
    ref = REFERENCE_MFLOPS.get((model_name, preset or ""))
    return None if ref is None else np.asarray(ref, dtype=np.float64)


def default_input_shape(model: MultiExitModel) -> tuple[int, int, int]:
    """(C, H, W) a registry-built model expects, from its config's ``in_chans`` and ``img_size``."""
    cfg = getattr(model, "config", None) or {}
    if "in_chans" not in cfg or "img_size" not in cfg:
        raise ValueError("model has no in_chans/img_size in its config: pass input_shape explicitly")
    return (int(cfg["in_chans"]), int(cfg["img_size"]), int(cfg["img_size"]))

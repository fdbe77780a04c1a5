"""Every exit's logits on a data split: the rows of the outputs contract (docs/architecture.md)."""

from __future__ import annotations

import numpy as np
import torch

from pcee.models.base import MultiExitModel
from pcee.outputs import ExitOutputs


@torch.no_grad()
def predict_all_exits(
    model: MultiExitModel, x: np.ndarray, batch_size: int = 512, device: str | torch.device | None = None
) -> np.ndarray:
    """Logits of all L exits for inputs ``x`` (N, C, H, W) -> float32 (N, L, K), in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(x), batch_size):
            xb = torch.as_tensor(
                np.ascontiguousarray(x[start : start + batch_size]), dtype=torch.float32, device=device
            )
            logits = model(xb)  # L x (B, K)
            chunks.append(torch.stack(logits, dim=1).float().cpu().numpy())  # (B, L, K)
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("cannot compute outputs of an empty split")
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)


def compute_outputs(model: MultiExitModel, split, flops: np.ndarray, batch_size: int = 512, device=None) -> ExitOutputs:
    """The outputs contract rows for one split (an ``ArraySplit`` with ``x`` (N,C,H,W) and ``y`` (N,)).

    ``flops`` is the model's cumulative per-exit cost F_l (L,), e.g. from ``measure_exit_flops``.
    """
    logits = predict_all_exits(model, split.x, batch_size=batch_size, device=device)
    flops = np.asarray(flops, dtype=np.float64)
    if flops.shape != (logits.shape[1],):
        raise ValueError(f"flops must have one entry per exit ({logits.shape[1]}), got shape {flops.shape}")
    return ExitOutputs(logits=logits, labels=np.asarray(split.y, dtype=np.int64), flops=flops)


def exit_accuracies(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 accuracy of each exit: (N, L, K) logits, (N,) labels -> (L,)."""
    return (logits.argmax(axis=2) == labels[:, None]).mean(axis=0)

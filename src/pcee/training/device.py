"""Where training runs: the device (this process's GPU under torchrun)."""

from __future__ import annotations

import torch

from pcee.training.distributed import current_context


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (this process's GPU: LOCAL_RANK under torchrun) or ``auto``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available; valid devices here: cpu, auto")
        index = current_context().local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)

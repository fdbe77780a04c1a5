"""Where training runs and where its data lives: the device, and the training split on it or streamed to it.

The training split moves to the device once when it fits (``data_placement="auto"``: at most
:data:`DEVICE_DATA_SHARE` of the device's free memory; always on CPU, where it already is), so a step
indexes device memory and copies nothing. When it does not fit (or ``"host"``), each batch is gathered on
the host (into pinned memory on CUDA) and copied with ``non_blocking``. Either way the batches hold the same values,
so the placement never changes the weights. Batches are chosen by a tensor of indices on the data's
device, so no step waits for the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pcee.training.distributed import current_context

#: the share of the device's free memory the training split may take when ``data_placement="auto"``
#: (the rest is for the model, its activations and the optimizer state)
DEVICE_DATA_SHARE = 0.25


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


def as_tensor(a, dtype: torch.dtype) -> torch.Tensor:
    """A numpy array or a tensor (wherever it is) as a contiguous tensor of ``dtype``; no copy when it already is one."""
    if isinstance(a, torch.Tensor):
        return a.to(dtype=dtype).contiguous()
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)


def fits_on_device(nbytes: int, free_bytes: int, share: float = DEVICE_DATA_SHARE) -> bool:
    """Whether ``nbytes`` of training data may live on a device with ``free_bytes`` free."""
    return nbytes <= share * free_bytes


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    raise ValueError(f"no free-memory query for device type {device.type!r}")


@dataclass
class TrainData:
    """The training split, on the device (``on_device``) or on the host, batched by index tensors."""

    x: torch.Tensor
    y: torch.Tensor
    device: torch.device
    on_device: bool

    @classmethod
    def place(cls, x, y, device: torch.device, placement: str = "auto") -> TrainData:
        """Put ``x`` (N, ...) float32 and ``y`` (N,) int64 where ``placement`` says (see the module docstring)."""
        x, y = as_tensor(x, torch.float32), as_tensor(y, torch.int64)
        if placement == "auto":  # on CPU the host is the device: the data is already there
            on_device = (
                device.type == "cpu"
                or x.device == device
                or fits_on_device(x.numel() * x.element_size() + y.numel() * y.element_size(), _free_bytes(device))
            )
        else:
            on_device = placement == "device"
        if on_device:
            return cls(x.to(device), y.to(device), device, True)
        return cls(x.cpu(), y.cpu(), device, False)

    def __len__(self) -> int:
        return len(self.y)

    def order(self, indices: list[int]) -> torch.Tensor:
        """An epoch's sample order as one index tensor where the data is (one copy per epoch)."""
        return torch.tensor(indices, dtype=torch.int64).to(self.x.device)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` (an index tensor from :meth:`order`) on the device."""
        if self.on_device:
            return self.x.index_select(0, idx), self.y.index_select(0, idx)
        # gathered straight into pinned memory on CUDA (torch's caching host allocator: a block is reused
        # once its copy is done), so the copy below does not wait for the host
        pin = self.device.type == "cuda"
        xb = torch.empty((len(idx), *self.x.shape[1:]), dtype=self.x.dtype, pin_memory=pin)
        yb = torch.empty((len(idx),), dtype=self.y.dtype, pin_memory=pin)
        torch.index_select(self.x, 0, idx, out=xb)
        torch.index_select(self.y, 0, idx, out=yb)
        return xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)

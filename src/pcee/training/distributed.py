"""Data-parallel plumbing: the same training entry point runs alone or under ``torchrun``.

``torchrun --nproc_per_node N`` sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; :func:`init_distributed`
then joins the process group (gloo on CPU, nccl on CUDA). Each rank trains on its DistributedSampler
shard; DDP averages gradients; only rank 0 evaluates for the outputs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def current_context() -> DistContext:
    """Rank and world size of the running process group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext()


def init_distributed(device: str = "cpu") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment; no-op when run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or not dist.is_available():
        return current_context()
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return current_context()


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group; ``wait`` first lets every rank finish (skip it on errors: a failed
    rank would never reach the barrier)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap_ddp(
    module: nn.Module, ctx: DistContext, device: torch.device, find_unused_parameters: bool = True
) -> nn.Module:
    """Wrap for data parallelism when running distributed, else return ``module`` itself.

    DDP registers only parameters with ``requires_grad`` at construction, so the trainer re-wraps
    per phase after freezing. ``find_unused_parameters`` is needed when some trainable parameter
    feeds no loss of the phase (DDP would otherwise wait forever for its gradient); the trainer
    probes for that once per phase.
    """
    if not ctx.enabled:
        return module
    device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """Mean of a scalar over ranks (for logging the training loss)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size

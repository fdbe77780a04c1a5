"""What decides a training run's weights besides its config and seed: pinned for the run, and recorded.

A fixed seed gives the same weights only where these are the same too. Found by training the small CNN
on digits twice in fresh processes and comparing state_dict hashes (docs/architecture.md, "Reproducible
training"; torch 2.13 on a 2-core AMD EPYC):

- **torch's intra-op thread count** changes the weights (1 and 2 threads differ: CPU kernels split their
  reductions by thread). ``TrainConfig.threads`` pins it for the run (None: the process's count, recorded);
  ``OMP_NUM_THREADS`` does not matter once the count is set.
- **the CPU's instruction set** changes them: ATen's kernels (``ATEN_CPU_CAPABILITY`` avx2 vs avx512) and
  oneDNN's (``ONEDNN_MAX_CPU_ISA``, and whether oneDNN is used at all) each give other weights. The record
  names the CPU, ATen's capability, a digest of the CPU's features and cache sizes, and oneDNN's switch.
  A run under ``ONEDNN_MAX_CPU_ISA`` is on another kind of machine that the record cannot see.
- **on CUDA**: the GPU, CUDA and cuDNN versions, cuDNN's algorithm choice (``deterministic``: cuDNN's
  deterministic algorithms and no benchmarking; otherwise it benchmarks, which picks the fastest and may
  pick differently between runs) and TF32. Bitwise repeatable cuBLAS also needs
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment (torch warns under ``deterministic`` when missing).
- not: torch's deterministic-algorithms switch on CPU (same weights on and off), the data order (a seeded
  sampler), augmentation (its own seeded generator on the CPU, whatever the device), the data's placement
  (on the device or copied per batch), the per-epoch loss read.

The torch version and the number of data-parallel processes (each trains on its shard) are in the record
too. It goes into the evidence cache key (``benchmarks/evidence/evidence_common.py``), ``pcee train``'s
``meta.json`` (``training_environment``), the train flow's MLflow params (``train_env.*``) and bundle meta.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pcee.training.config import TrainConfig
from pcee.training.device import resolve_device
from pcee.training.distributed import current_context

# machine properties that say how many cores it has, not which kernels run (the thread count does that)
_NOT_KERNEL_CHOICE = ("num_logical_cores", "num_physical_cores", "num_sockets")


def cpu_record() -> dict[str, Any]:
    """The CPU as torch's kernels see it: name, ATen's vector capability, oneDNN's switch, a features digest."""
    caps = dict(torch.cpu.get_capabilities()) if hasattr(torch.cpu, "get_capabilities") else {}
    features = {k: v for k, v in caps.items() if k not in _NOT_KERNEL_CHOICE}
    digest = hashlib.sha256(json.dumps(features, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {
        "cpu": str(caps.get("cpu_name", "unknown")),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_features": digest,
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
    }


def cuda_record(device: torch.device) -> dict[str, Any]:
    """The GPU and the CUDA switches that choose its kernels."""
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "gpu": torch.cuda.get_device_name(device),
        "gpu_capability": f"{major}.{minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
    }


def current_record(device: torch.device) -> dict[str, Any]:
    """What this process would train with now on ``device`` (see the module docstring)."""
    record: dict[str, Any] = {
        "torch": torch.__version__,
        "device": device.type,
        "world_size": current_context().world_size,
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        **cpu_record(),
    }
    if device.type == "cuda":
        record.update(cuda_record(device))
    return record


@contextmanager
def pinned_environment(config: TrainConfig, device: torch.device) -> Iterator[dict[str, Any]]:
    """Within the block: ``config.threads`` intra-op threads (when set), torch's deterministic algorithms as
    ``config.deterministic`` says (warn-only: a kernel without a deterministic version warns instead of
    aborting; uninitialised memory is not filled, a debugging aid that only costs time), and on CUDA cuDNN
    deterministic without benchmarking, or benchmarking when not deterministic. Yields the record of what
    decides the weights; restores every switch afterwards."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,  # pyright: ignore[reportAttributeAccessIssue]
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    try:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # pyright: ignore[reportAttributeAccessIssue]
        if device.type == "cuda":
            torch.backends.cudnn.deterministic = config.deterministic
            torch.backends.cudnn.benchmark = not config.deterministic
        yield current_record(device)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.utils.deterministic.fill_uninitialized_memory = saved[3]  # pyright: ignore[reportAttributeAccessIssue]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[4], saved[5]


def training_environment(config: TrainConfig) -> dict[str, Any]:
    """The record a run of ``config`` would have if it started now in this process (for cache keys: the
    same dict :func:`pcee.training.train_model` returns as ``history.environment``)."""
    with pinned_environment(config, resolve_device(config.device)) as record:
        return record


def weights_digest(model_or_checkpoint: torch.nn.Module | str | os.PathLike) -> str:
    """SHA-256 of a model's weights (names and bytes of its state_dict, in name order), or of a checkpoint's
    (``model.pt``, or a directory holding one): equal digests, bit-for-bit equal weights."""
    if isinstance(model_or_checkpoint, torch.nn.Module):
        state = model_or_checkpoint.state_dict()
    else:
        path = Path(model_or_checkpoint)
        state = torch.load(path / "model.pt" if path.is_dir() else path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()

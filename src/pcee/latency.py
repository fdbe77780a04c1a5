"""Per-exit cost in time: latency profiles measured on the serving machine.

FLOPs predict time badly for early-exit networks on a CPU: an early MSDNet segment does little
arithmetic but many small convolutions, so an operating point chosen on FLOPs can promise a saving
the server does not deliver. A :class:`LatencyProfile` is what one sample costs, in seconds, to
reach each exit (cumulative, like ``ExitOutputs.flops``), measured segment by segment with the
model's own ``forward_segment`` at the batch sizes the server uses. Any cumulative per-exit cost
can stand where FLOPs stand (the sweep, the operating point's budget and relative cost, the
reports): :meth:`LatencyProfile.cost` is that vector, and ``ExitOutputs.with_cost`` swaps it in.

Timing is on whatever machine runs :func:`measure_exit_latency` (``pcee profile``): measure where
you serve. Medians over ``repeats`` timed passes after ``warmup`` untimed ones; torch's thread
count is recorded with the profile.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcee.models.base import MultiExitModel

#: batch sizes profiled by default: a lone request, a small and a full micro-batch (``pcee serve --max-batch`` 64)
DEFAULT_BATCH_SIZES = (1, 8, 64)
COSTS = ("flops", "latency")


@dataclass(frozen=True)
class LatencyProfile:
    """Cumulative seconds per sample to reach each exit, per profiled batch size.

    ``per_sample_s[b, l]``: at batch size ``batch_sizes[b]``, the time of segments 0..l (each with
    its exit head) divided by the batch size. Non-decreasing in ``l``.
    """

    batch_sizes: tuple[int, ...]
    per_sample_s: np.ndarray  # (B, L) float64
    threads: int
    repeats: int
    machine: str

    def __post_init__(self) -> None:
        arr = np.asarray(self.per_sample_s, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] != len(self.batch_sizes) or arr.shape[1] < 1:
            raise ValueError(
                f"per_sample_s must be (batch sizes {len(self.batch_sizes)}, exits), got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError("latency profile values must be finite and > 0")
        if np.any(np.diff(arr, axis=1) < 0):
            raise ValueError("latency profile must be cumulative: non-decreasing over the exits")
        object.__setattr__(self, "per_sample_s", arr)

    @property
    def num_exits(self) -> int:
        return self.per_sample_s.shape[1]

    def cost(self, batch_size: int | None = None) -> np.ndarray:
        """(L,) cumulative seconds per sample at ``batch_size`` (the nearest profiled one; default the
        largest, the micro-batches a loaded server runs)."""
        if batch_size is None:
            row = int(np.argmax(self.batch_sizes))
        else:
            row = int(np.argmin([abs(b - batch_size) for b in self.batch_sizes]))
        return self.per_sample_s[row].copy()

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "per_sample_s": self.per_sample_s.tolist(),
            "threads": self.threads,
            "repeats": self.repeats,
            "machine": self.machine,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyProfile:
        try:
            return cls(
                batch_sizes=tuple(int(b) for b in d["batch_sizes"]),
                per_sample_s=np.asarray(d["per_sample_s"], dtype=np.float64),
                threads=int(d.get("threads", 0)),
                repeats=int(d.get("repeats", 0)),
                machine=str(d.get("machine", "")),
            )
        except KeyError as err:
            raise ValueError(f"a latency profile needs {err.args[0]!r}; got keys {sorted(d)}") from None

    def markdown(self, flops: np.ndarray | None = None) -> str:
        """Per exit: cumulative ms per sample at each batch size, its share of the final exit's time,
        and (given ``flops``) the FLOPs share beside it."""
        head = (
            "| exit | "
            + " | ".join(f"ms/sample @ batch {b}" for b in self.batch_sizes)
            + " | time share (largest batch)"
        )
        sep = "|---|" + "---|" * len(self.batch_sizes) + "---|"
        if flops is not None:
            head += " | FLOPs share"
            sep += "---|"
        lines = [head + " |", sep]
        share = self.cost() / self.cost()[-1]
        for exit_index in range(self.num_exits):
            cells = [f"{1000 * self.per_sample_s[b, exit_index]:.4f}" for b in range(len(self.batch_sizes))]
            row = f"| {exit_index} | " + " | ".join(cells) + f" | {share[exit_index]:.3f}"
            if flops is not None:
                row += f" | {float(flops[exit_index]) / float(flops[-1]):.3f}"
            lines.append(row + " |")
        return "\n".join(lines)


def measure_exit_latency(
    model: MultiExitModel,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    repeats: int = 20,
    warmup: int = 3,
    seed: int = 0,
) -> LatencyProfile:
    """Time each segment (with its exit head) of ``model`` on random inputs of ``input_shape``
    (C, H, W) at each batch size; the profile is the cumulative median per sample."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    try:
        with torch.inference_mode():
            for b in sizes:
                x = torch.rand((b, *input_shape), generator=gen)
                times = np.empty((repeats, model.num_exits))
                for r in range(warmup + repeats):
                    state = model.initial_state(x)
                    for k in range(model.num_exits):
                        t0 = time.perf_counter()
                        state, _ = model.forward_segment(k, state)
                        if r >= warmup:
                            times[r - warmup, k] = time.perf_counter() - t0
                rows.append(np.cumsum(np.median(times, axis=0)) / b)
    finally:
        model.train(was_training)
    machine = f"{platform.machine()} {platform.processor() or platform.system()}".strip()
    return LatencyProfile(sizes, np.stack(rows), torch.get_num_threads(), repeats, machine)


def cost_vector(
    flops: np.ndarray, profile: LatencyProfile | dict | None, cost: str | None = None
) -> tuple[np.ndarray, str]:
    """The per-exit cost to choose with and its name: ``cost`` "latency" needs a profile; ``None``
    means latency where a profile exists, else FLOPs."""
    if cost is not None and cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; valid: {', '.join(COSTS)}")
    if isinstance(profile, dict):
        profile = LatencyProfile.from_dict(profile)
    if cost == "latency" and profile is None:
        raise ValueError("cost 'latency' needs a latency profile: run `pcee profile` on the serving machine first")
    if cost == "flops" or profile is None:
        return np.asarray(flops, dtype=np.float64), "flops"
    vec = profile.cost()
    if vec.shape != np.shape(flops):
        raise ValueError(f"the latency profile has {vec.shape[0]} exits, the model {np.shape(flops)[0]}")
    return vec, "latency"


def read_latency_profile(path: str | os.PathLike | None) -> dict | None:
    """A latency profile from a JSON file or from a bundle directory's meta.json; None without a path."""
    if path is None:
        return None
    src = Path(path)
    if src.is_dir():
        meta_path = src / "meta.json"
        profile = json.loads(meta_path.read_text()).get("latency_profile") if meta_path.is_file() else None
        if profile is None:
            raise ValueError(f"{src} has no latency profile in meta.json: run `pcee profile --bundle {src}` first")
        return profile
    if not src.is_file():
        raise FileNotFoundError(f"latency profile {src} does not exist")
    try:
        return json.loads(src.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"latency profile {src} is not JSON: {err}") from None

"""CUDA graphs of a model's segments, one per (segment, bucketed batch size).

A segment on a few rows is launch-bound on a GPU: its dozens of kernel launches cost more than its
arithmetic. A CUDA graph replays them all with one launch, but has fixed shapes, so the runner pads
every batch it runs (with copies of a real row, whose outputs it drops) up to a *bucket*: the powers
of two below the batch size, and the batch size. The first call of a segment at a bucket captures its
graph (after warm-up runs on a side stream, as torch's CUDA-graph documentation asks); every later
call copies the state into the graph's static input, replays, and returns a copy of the static
output (the next replay of that graph overwrites it, and a window holds several batches at one
exit). A call at a size that is not a bucket runs the segment as it is (``run_all_exits``), and so does a
segment whose capture fails (one that reads a value back on the host), with a warning.

The capture is the one piece that needs CUDA (:func:`cuda_capture`). On a CPU device the graphs are
eager replays (:func:`eager_capture`): the same buckets, static buffers and copies, no speed-up; the
tests run the bucketing and the replay contract that way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from pcee.models.base import State

log = logging.getLogger("pcee.inference")

Segment = Callable[[State], tuple[State, torch.Tensor]]
#: capture(segment, static input) -> (replay, static output state, static output logits)
Capture = Callable[[Segment, State], tuple[Callable[[], None], State, torch.Tensor]]
#: eager runs of a segment on a side stream before its capture (cuDNN/cuBLAS choose and warm their kernels)
CAPTURE_WARMUP = 3


def buckets(batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``batch_size``, then ``batch_size``."""
    out, b = [], 1
    while b < batch_size:
        out.append(b)
        b *= 2
    return (*out, int(batch_size))


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    """``fn`` applied to every tensor of a state (lists and tuples kept, None stays None)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, (list, tuple)):
        return type(state)(None if s is None else map_state(fn, s) for s in state)
    raise TypeError(f"unsupported state element of type {type(state).__name__}")


def copy_state(dst: State, src: State) -> None:
    """Copy every tensor of ``src`` into the same place of ``dst`` (one structure, same shapes)."""
    if isinstance(dst, torch.Tensor):
        assert isinstance(src, torch.Tensor)
        dst.copy_(src)
        return
    for d, s in zip(dst, src, strict=True):  # type: ignore[arg-type]  # lists/tuples of one structure
        if d is not None:
            copy_state(d, s)


def rows_of(state: State) -> int:
    """The batch size (dim 0) of a state."""
    if isinstance(state, torch.Tensor):
        return int(state.shape[0])
    return next(rows_of(s) for s in state if s is not None)  # type: ignore[union-attr]


def cuda_capture(pool: Any = None) -> Capture:
    """A capture into ``torch.cuda.CUDAGraph`` s sharing the memory pool ``pool`` (outputs are copied out
    right after each replay, so graphs replayed one after another may share it)."""

    def capture(segment: Segment, static_in: State) -> tuple[Callable[[], None], State, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP):
                segment(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            state, z = segment(static_in)
        return graph.replay, state, z

    return capture


def eager_capture(segment: Segment, static_in: State) -> tuple[Callable[[], None], State, torch.Tensor]:
    """The replay contract without CUDA: each replay runs the segment on the static input and copies its
    outputs into the static outputs."""
    state, z = segment(static_in)
    static_state, static_z = map_state(torch.clone, state), z.clone()

    def replay() -> None:
        new_state, new_z = segment(static_in)
        copy_state(static_state, new_state)
        static_z.copy_(new_z)

    return replay, static_state, static_z


class GraphedSegments:
    """``segment k`` of ``segments`` through its graph at the call's batch size when that is a bucket."""

    def __init__(self, segments: list[Segment], batch_size: int, capture: Capture) -> None:
        self.segments = segments
        self.buckets = buckets(batch_size)
        self.capture = capture
        #: (segment, rows) -> (static input, replay, static output state, static output logits)
        self.graphs: dict[tuple[int, int], tuple[State, Callable[[], None], State, torch.Tensor]] = {}
        #: (segment, rows) whose capture failed: run eagerly
        self.eager: set[tuple[int, int]] = set()

    def bucket(self, n: int) -> int:
        """The smallest bucket of at least ``n`` rows (``n`` itself beyond the largest)."""
        return next((b for b in self.buckets if b >= n), n)

    def __call__(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        n = rows_of(state)
        if n not in self.buckets or (k, n) in self.eager:
            return self.segments[k](state)
        graph = self.graphs.get((k, n))
        if graph is None:
            static_in = map_state(torch.clone, state)
            try:
                graph = self.graphs[(k, n)] = (static_in, *self.capture(self.segments[k], static_in))
            except RuntimeError as err:  # a segment that syncs with the host (.item(), data-dependent shapes)
                log.warning("segment %d at %d rows cannot be captured in a CUDA graph, runs eagerly: %s", k, n, err)
                self.eager.add((k, n))
                return self.segments[k](state)
        else:
            copy_state(graph[0], state)
        _, replay, static_state, static_z = graph
        replay()
        return map_state(torch.clone, static_state), static_z.clone()

"""Host <-> device transfers of the runner's device path.

On CUDA the input rows of each window go through a pinned (page-locked) host buffer and a
``non_blocking`` copy on a side stream, and the next window's copy is issued before the current
window computes, so it overlaps the compute; the answers come back once per window through pinned
buffers, with one synchronisation. Two pinned input buffers alternate; a buffer is refilled only after
its previous copy has finished (its event). On a CPU device nothing is copied: the input is used as a
tensor and the answer buffers are read in place.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class Stager:
    """Input windows to the device and answer buffers back (see the module docstring)."""

    def __init__(self, device: torch.device, channels_last: bool = False) -> None:
        self.device = device
        self.channels_last = channels_last
        self.cuda = device.type == "cuda"
        self._pinned_in: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._pinned_out: dict[int, torch.Tensor] = {}
        self._stream = torch.cuda.Stream(device) if self.cuda else None

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def windows(
        self, x: np.ndarray | torch.Tensor, ranges: Sequence[tuple[int, int]]
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, rows start:stop of x on the device)`` for each range, in order."""
        if not self.cuda:
            for start, stop in ranges:
                t = torch.as_tensor(x[start:stop], dtype=torch.float32).to(self.device)
                yield start, stop, self._layout(t)
            return
        pending = self._launch(x, ranges, 0) if ranges else None
        for i, (start, stop) in enumerate(ranges):
            assert pending is not None
            current, pending = pending, (self._launch(x, ranges, i + 1) if i + 1 < len(ranges) else None)
            t, ready = current
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            t.record_stream(stream)  # allocated on the copy stream, used on this one
            yield start, stop, self._layout(t)

    def _launch(
        self, x: np.ndarray | torch.Tensor, ranges: Sequence[tuple[int, int]], i: int
    ) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Issue the copy of window ``i``: into pinned buffer ``i % 2``, then to the device on the side stream."""
        start, stop = ranges[i]
        rows = torch.as_tensor(x[start:stop], dtype=torch.float32)
        if rows.device.type != "cpu":  # already on a device: no staging
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            return rows.to(self.device), done
        slot = i % 2
        previous = self._copied[slot]
        if previous is not None:
            previous.synchronize()  # its previous copy has left the buffer
        buf = self._pinned_in[slot]
        if buf is None or buf.numel() < rows.numel():
            buf = self._pinned_in[slot] = torch.empty(rows.numel(), dtype=torch.float32, pin_memory=True)
        host = buf[: rows.numel()].view(rows.shape)
        host.copy_(rows)
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            t = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._copied[slot] = done
        return t, done

    def to_host(self, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """numpy views of ``tensors`` on the host: in place on a CPU device; on CUDA through pinned buffers,
        non_blocking, then one synchronisation. The views are reused by the next call: copy what you keep."""
        if not self.cuda:
            return [t.numpy() for t in tensors]
        out = []
        for k, t in enumerate(tensors):
            buf = self._pinned_out.get(k)
            nbytes = t.numel() * t.element_size()
            if buf is None or buf.numel() < nbytes:
                buf = self._pinned_out[k] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            host = buf[:nbytes].view(t.dtype).view(t.shape)
            host.copy_(t, non_blocking=True)
            out.append(host)
        torch.cuda.current_stream(self.device).synchronize()  # the window's one wait for the device
        return [h.numpy() for h in out]

"""Host <-> device transfers of the runner's device path.

On CUDA the input rows of each window go through a pinned (page-locked) host buffer and a
``non_blocking`` copy on a side stream; the answers come back once per window through pinned
buffers, with one synchronisation. The runner asks for the next window's copy (:meth:`Stager.prefetch`)
once the current window's first kernels are queued, so the host copy into the pinned buffer and the
transfer run while the device computes. Two pinned input buffers alternate; a buffer is refilled only
after its previous copy has finished (its event). On a CPU device nothing is copied: the input is used as a
tensor and the answer buffers are read in place.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        self._x: np.ndarray | torch.Tensor = np.zeros(0)
        self._ranges: list[tuple[int, int]] = []
        self._issued: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}  # window -> (rows, copied)

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def begin(self, x: np.ndarray | torch.Tensor, ranges: Sequence[tuple[int, int]]) -> None:
        """Stage the rows ``ranges`` of ``x``, window by window (:meth:`window`, :meth:`prefetch`)."""
        self._x, self._ranges = x, list(ranges)
        self._issued = {}

    def end(self) -> None:
        """Let go of the input (the pinned buffers stay for the next run)."""
        self.begin(np.zeros(0), ())

    def window(self, i: int) -> torch.Tensor:
        """Rows of window ``i`` on the device, ready for the current stream."""
        if not self.cuda:
            start, stop = self._ranges[i]
            return self._layout(torch.as_tensor(self._x[start:stop], dtype=torch.float32).to(self.device))
        self.prefetch(i)
        t, ready = self._issued.pop(i)
        stream = torch.cuda.current_stream(self.device)
        if ready is not None:
            stream.wait_event(ready)
            t.record_stream(stream)  # allocated on the copy stream, used on this one
        return self._layout(t)

    def prefetch(self, i: int) -> None:
        """Issue the copy of window ``i`` (if there is one and it is not issued yet): the runner calls this
        for the next window once the current one's first kernels are queued, so that the host copy into
        the pinned buffer and the transfer overlap the device's compute."""
        if not self.cuda or i >= len(self._ranges) or i in self._issued:
            return
        start, stop = self._ranges[i]
        rows = torch.as_tensor(self._x[start:stop], dtype=torch.float32)
        if rows.device.type != "cpu":  # already on a device: no staging
            self._issued[i] = (rows.to(self.device), None)
            return
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
        self._issued[i] = (t, done)

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

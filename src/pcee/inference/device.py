"""The runner's device path (``decide="torch"``): decisions, bookkeeping and regrouping on the device.

A *window* of up to ``regroup`` batches runs exit by exit. At each exit every batch of the window
runs its segment; its logits go into a device buffer (window rows, L, K), and the policy's rule in
torch form (:mod:`pcee.policies.rules`) decides on the device which undecided samples leave (their
exit is written into a device buffer) and which it is unsure about (a score within the guard of a
threshold or bin edge: those run on, their logits kept, and numpy decides them when the window is
done). Nothing goes to the host per sample: one small read per exit brings back how many samples of
each batch go on (the *level's sync*, one for the whole window), and with those counts the host plans
the next segment calls:

- a batch that nobody goes on with stops, a full batch that nobody left goes on as it is;
- a batch where the split does not pay (:class:`pcee.inference.splits.SplitCheck`, from the latency
  profile of this device) goes on together, the decided samples riding along: their answers stay
  those of the exit the policy chose, because their logits there are kept;
- the survivors of the batches where it pays are regrouped into full batches (a gather of their
  state rows, each copied once; :func:`pcee.models.base.gather_states`), the last one padded with
  copies of a surviving row up to ``min(batch rows, min_rows)`` (and up to a bucket with CUDA graphs).

When the window is done its buffers come to the host in one transfer (the window's last sync), the
unsure samples are decided by the rule's numpy form on their kept logits, and the answer columns are
computed in numpy (:meth:`pcee.inference.answers.AnswerSheet.write_batch`). So a window of B batches
synchronises with the host at most L times (L - 1 exits and the end): a lone batch once per exit
(whether to stop or split needs the counts), a full window of B >= L batches at most once per batch.
A rule without a torch form (:class:`pcee.policies.rules.AskPolicy`) is asked on the host at each
exit, one more transfer there.

The answers equal the numpy path's: every sample's decisions are numpy's, and every segment runs on
as many rows as the full forward's kernels saw or at least ``min_rows`` (CPU kernels give each row
the same result there; on a GPU the kernels a library picks may depend on the row count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from pcee.calibration.scores import confidence
from pcee.inference.answers import AnswerSheet
from pcee.inference.graphs import Segment
from pcee.inference.splits import SplitCheck
from pcee.inference.staging import Stager
from pcee.models.base import MultiExitModel, State, gather_states, index_state
from pcee.policies.rules import DeviceRule, ExitRule


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` ("cpu", "cuda", "cuda:1"); ValueError naming the problem when this
    machine has no such device."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this machine has no CUDA device (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: pcee runs on cpu or cuda")
    return device


def device_name(device: torch.device) -> str:
    """How a device is named in a latency profile and /health: cpu, or cuda:<index> <device name>."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


@dataclass
class _Batch:
    """Rows of the window that run together: ``state`` holds ``n_run`` rows, the first ``n`` the window
    rows ``rows`` (device, int64), the rest copies; ``go`` (device bool, (n,)) marks the undecided after
    the last exit."""

    state: State
    rows: torch.Tensor
    n: int
    n_run: int
    go: torch.Tensor | None = None


def kept_positions(go: torch.Tensor, n_go: int) -> torch.Tensor:
    """Positions of the ``n_go`` True entries of ``go``, in order, without a host sync (``nonzero``
    would wait for the device to know its size): a scatter of each kept position to its rank."""
    rank = torch.cumsum(go, 0) - 1
    out = torch.empty(n_go + 1, dtype=torch.int64, device=go.device)
    out.scatter_(0, torch.where(go, rank, n_go), torch.arange(go.numel(), device=go.device))
    return out[:n_go]  # slot n_go took every dropped position


def pad_rows(index: torch.Tensor, rows: int) -> torch.Tensor:
    """``index`` followed by copies of its first entry, up to ``rows`` entries."""
    short = rows - int(index.numel())
    return index if short <= 0 else torch.cat([index, index[:1].expand(short)])


class DevicePath:
    """The device path of one runner (see the module docstring); ``run`` fills an :class:`AnswerSheet`."""

    def __init__(
        self,
        num_exits: int,
        device: torch.device,
        batch_size: int,
        min_rows: int,
        splits: SplitCheck,
        stager: Stager,
        bucket: Callable[[int], int] | None = None,
    ) -> None:
        self.num_exits, self.device = num_exits, device
        self.batch_size, self.min_rows, self.splits, self.stager = batch_size, min_rows, splits, stager
        self.bucket = bucket
        self.model: MultiExitModel | None = None  # the model and segments of the current run
        self.segments: Sequence[Segment] = ()
        self._exit = torch.empty(0, dtype=torch.int64, device=device)  # per window row: its exit (L-1: undecided)
        self._unsure = torch.empty((0, self.num_exits), dtype=torch.bool, device=device)
        self._logits: torch.Tensor | None = None  # (rows, L, K) float32
        #: host reads of device values since the runner was built (the level syncs and window transfers)
        self.syncs = 0
        #: decisions the torch form was unsure of, made by the numpy form at the end of their window
        self.decided_on_host = 0

    def run(
        self,
        model: MultiExitModel,
        segments: Sequence[Segment],
        x: np.ndarray | torch.Tensor,
        windows: Sequence[tuple[int, int]],
        rule: ExitRule,
        sheet: AnswerSheet,
    ) -> None:
        """Answer the rows of ``x`` window by window into ``sheet`` (``model`` gives each batch's initial
        state, ``segments[k]`` runs segment k)."""
        self.model, self.segments = model, segments
        dev_rule = rule.on_device(self.device)
        self.stager.begin(x, windows)
        for i, (start, stop) in enumerate(windows):
            w = stop - start
            xw = self.stager.window(i)
            self._reset(w)
            self._run_window(xw, w, rule, dev_rule, lambda i=i: self.stager.prefetch(i + 1))
            exits, logits = self._finish(w, rule)
            sheet.write_batch(start, exits, logits, rule)
        self.stager.end()

    def _reset(self, w: int) -> None:
        if self._exit.numel() < w:
            self._exit = torch.empty(w, dtype=torch.int64, device=self.device)
            self._unsure = torch.empty((w, self.num_exits), dtype=torch.bool, device=self.device)
            self._logits = None
        self._exit[:w] = self.num_exits - 1
        self._unsure[:w] = False

    def _rows_to_run(self, n: int, pad_to: int) -> int:
        rows = max(n, pad_to)
        return self.bucket(rows) if self.bucket is not None else rows

    def _first_batches(self, xw: torch.Tensor, w: int) -> list[_Batch]:
        out = []
        for s in range(0, w, self.batch_size):
            n = min(self.batch_size, w - s)
            xb, n_run = xw[s : s + n], self._rows_to_run(n, 0)
            if n_run > n:  # CUDA graphs: the batch itself up to its bucket
                xb = cast(torch.Tensor, index_state(xb, pad_rows(torch.arange(n, device=self.device), n_run)))
            assert self.model is not None
            state = self.model.initial_state(xb)
            out.append(_Batch(state, torch.arange(s, s + n, device=self.device), n, n_run))
        return out

    def _run_window(
        self, xw: torch.Tensor, w: int, rule: ExitRule, dev_rule: DeviceRule | None, prefetch: Callable[[], None]
    ) -> None:
        batches = self._first_batches(xw, w)
        pad_to = min(self.batch_size, w, self.min_rows)
        for level in range(self.num_exits):
            counts = [self._step(level, b, rule, dev_rule) for b in batches]
            if level == 0:
                prefetch()  # the next window's input copy, while the device runs this exit
            if level == self.num_exits - 1:
                return
            n_go = torch.stack(counts).tolist()  # the level's one sync: how many go on, per batch
            self.syncs += 1
            batches = self._plan(level, batches, n_go, pad_to)
            if not batches:
                return

    def _step(self, level: int, b: _Batch, rule: ExitRule, dev_rule: DeviceRule | None) -> torch.Tensor:
        """Segment ``level`` on batch ``b``: its logits kept, the device decisions written; returns the
        count (device) of its samples still undecided."""
        b.state, z = self.segments[level](b.state)
        z = z[: b.n].float()
        if self._logits is None:  # K is known from the first logits; (re)allocated with the row buffers
            self._logits = torch.empty((self._exit.numel(), self.num_exits, z.shape[1]), device=self.device)
        self._logits[b.rows, level] = z
        if level == self.num_exits - 1:
            return z.new_zeros((), dtype=torch.int64)
        if dev_rule is None:  # a rule without a torch form: its numpy form, on the host
            zh = z.cpu().numpy()
            self.syncs += 1
            leave = torch.as_tensor(rule.decide(level, zh, confidence(zh, rule.score))[0], device=self.device)
            unsure = torch.zeros_like(leave)
        else:
            leave, unsure = dev_rule.leave(level, z)
        current = self._exit[b.rows]
        undecided = current == self.num_exits - 1
        newly = leave & ~unsure & undecided
        self._exit[b.rows] = torch.where(newly, level, current)
        self._unsure[b.rows, level] = unsure & undecided
        b.go = undecided & ~newly
        return b.go.sum()

    def _plan(self, level: int, batches: list[_Batch], n_go: list[int], pad_to: int) -> list[_Batch]:
        """The batches of the next segment: stopped, on together, or survivors regrouped (module docstring)."""
        going_on: list[_Batch] = []
        pool: list[tuple[_Batch, torch.Tensor]] = []  # (batch, positions of its samples that go on)
        for b, g in zip(batches, n_go, strict=True):
            if g == 0:
                continue  # all decided: stops
            if g == b.n and b.n == self.batch_size:
                going_on.append(b)  # a full batch that nobody left: on as it is
            elif g < b.n and not self.splits.pays(level, b.n_run, self._rows_to_run(g, pad_to)):
                going_on.append(b)  # the split does not pay: on together, the decided riding along
            else:  # its survivors (all rows of a partial batch nobody left) are regrouped
                assert b.go is not None
                pool.append((b, kept_positions(b.go, g)))
        if len(pool) == 1:
            b, keep = pool[0]
            n_run = self._rows_to_run(keep.numel(), pad_to)
            going_on.append(_Batch(index_state(b.state, pad_rows(keep, n_run)), b.rows[keep], keep.numel(), n_run))
        elif pool:
            going_on += self._regroup(pool, pad_to)
        return going_on

    def _regroup(self, pool: list[tuple[_Batch, torch.Tensor]], pad_to: int) -> list[_Batch]:
        """The survivors of several batches copied into full batches (each row once), the last padded."""
        merged = gather_states([(b.state, keep) for b, keep in pool])
        rows = torch.cat([b.rows[keep] for b, keep in pool])
        out = []
        for s in range(0, rows.numel(), self.batch_size):
            n = min(self.batch_size, rows.numel() - s)
            state, n_run = index_state(merged, slice(s, s + n)), self._rows_to_run(n, pad_to)
            if n_run > n:
                state = index_state(state, pad_rows(torch.arange(n, device=self.device), n_run))
            out.append(_Batch(state, rows[s : s + n], n, n_run))
        return out

    def _finish(self, w: int, rule: ExitRule) -> tuple[np.ndarray, np.ndarray]:
        """The window's buffers on the host (its last sync), the unsure samples decided by numpy."""
        assert self._logits is not None
        exits, unsure, logits = self.stager.to_host([self._exit[:w], self._unsure[:w], self._logits[:w]])
        self.syncs += 1
        exits = exits.copy()
        for level in range(self.num_exits - 1):
            rows = np.flatnonzero(unsure[:, level] & (level < exits))
            if rows.size:
                self.decided_on_host += int(rows.size)
                z = logits[rows, level]
                leave = rule.decide(level, z, confidence(z, rule.score))[0]
                exits[rows[leave]] = level
        return exits, logits

"""Early-exit inference that really skips the work of samples that already left.

The model runs segment by segment (``forward_segment``). After each non-final segment the policy's
rule decides, from that exit's logits alone, which samples leave; only the survivors' hidden state
is kept (``index_state``), so later segments run on a smaller batch. The answers equal "compute every
exit, then ``policy.decide``" because the rule sees the same logits.

What keeps the answers bit-identical to that reference, and cheap:

- *The policy's rule, asked once per run* (``policy.exit_rule()``, :mod:`pcee.policies.rules`). The
  runner does not know which policy it serves: it computes the rule's score once per exit and asks
  the rule; the library's policies compute their own ``exit_mask`` through the same rule, so the two
  are equal by construction. A policy without a rule of its own is asked ``exit_mask`` and
  ``expected_accuracy`` (:class:`~pcee.policies.rules.AskPolicy`).
- *Where the decisions run* (``decide``). ``"numpy"`` (the default on CPU): the rule's numpy form
  after each segment, the bookkeeping in numpy (on CPU a tensor's ``.numpy()`` is a view). ``"torch"``
  (the default on other devices): the rule's torch form, the bookkeeping, the regrouping and the
  answer buffers on the device, one host read per exit for a window of batches and one transfer at
  its end (:mod:`pcee.inference.device`); samples whose torch score is too close to a boundary run on
  and are decided in numpy from their kept logits. On CPU it measured slower than numpy (many tiny
  torch ops); it is there for accelerators.
- *No tiny survivor sets.* CPU kernels (MKL GEMM, oneDNN convolution) sum in another order below
  about 16 rows, so a sample's logits would change when only a few others survive with it. Survivor
  sets are padded with copies of a surviving row (their outputs are dropped) up to
  ``min(batch rows, min_rows)``: every segment runs on as many rows as a full forward of the batch
  would, or on at least ``min_rows``, where the kernels give each row the same result. A batch is
  never padded itself (a one-sample request costs one row), except up to its bucket with ``graphs``.
- *Full batches* (``regroup``). A segment call has fixed costs that a thinned batch pays for fewer
  samples. An input of several batches runs up to ``regroup`` of them together, exit by exit; after
  each exit the survivors of the batches that lost samples are copied into full batches
  (:func:`~pcee.models.base.gather_states`). A row's result does not depend on the other rows of a
  batch of ``min_rows`` rows or more, so the answers stay those of the full forward in the input's
  batches; a last batch under ``min_rows`` rows runs on its own, as the full forward ran it.
- *No selection of the leavers* (:class:`~pcee.inference.answers.AnswerSheet`). At an exit where some
  samples leave, every running sample's answer columns are written; those that go on are
  overwritten at their own exit, and the predictions are the answering logits' argmax, taken once.

Opt-in, *not* bit-identical (logits move by float rounding, so exits can differ at near-ties):
``fuse_bn``, ``channels_last`` and ``compile`` (:mod:`pcee.inference.optimize`), and ``graphs``
(:mod:`pcee.inference.graphs`: CUDA graphs per segment and bucketed batch size; batches padded to
their bucket).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

from pcee.calibration.scores import check_score, confidence
from pcee.inference.answers import AllExits, AnswerSheet, ExitResult, answer_columns
from pcee.inference.device import DevicePath, device_name, pad_rows
from pcee.inference.graphs import GraphedSegments, buckets, cuda_capture, eager_capture
from pcee.inference.splits import SplitCheck
from pcee.inference.staging import Stager
from pcee.models.base import MultiExitModel, State, gather_states, index_state
from pcee.policies.base import ExitPolicy
from pcee.policies.rules import ExitRule

if TYPE_CHECKING:  # a type only: pcee.latency measures with this runner
    from pcee.latency import LatencyProfile

__all__ = ["AllExits", "EarlyExitRunner", "ExitResult", "answer_columns"]  # answers re-exported: their old home

#: survivor sets are padded up to min(batch rows, MIN_ROWS) (CPU kernels are batch-size invariant from here up)
MIN_ROWS = 16
#: batches run together, their survivors regrouped into full batches after each exit (EarlyExitRunner ``regroup``)
REGROUP = 4
DECIDE_MODES = ("auto", "numpy", "torch")
#: a host chunk: (state, global indices of its samples, the same as a slice or an array)
_Chunk = tuple[State, np.ndarray, "slice | np.ndarray"]


class EarlyExitRunner:
    """Batched early-exit inference of a multi-exit model under an exit policy.

    Parameters
    ----------
    model : MultiExitModel
    policy : fitted ExitPolicy that decides without labels (``decides_with_labels`` False)
    flops : (L,) cumulative F_l reported per sample
    batch_size : samples per forward pass
    device : torch device for the model and inputs
    decide : where the exit decisions run (the answers are the same): "numpy" after each segment
        (the default on CPU), "torch" on the device with device-side bookkeeping (the default
        elsewhere), "auto" picks by device (see the module docstring)
    min_rows : survivor sets are padded with copies of a surviving row up to ``min(batch rows, min_rows)``,
        so that no segment runs on fewer rows than the full forward's kernels saw (0: never pad)
    regroup : an input of several batches runs up to this many batches at a time, exit by exit, and
        after each exit the survivors of the batches that lost samples are regrouped into full batches
        (1: every batch on its own); costs the hidden state of that many batches at once. A lone batch
        (a served micro-batch) runs as before.
    profile : the latency profile of this device (``pcee profile``): with ``decide="torch"``, a batch is
        split after an exit only where the profile says the smaller batch saves time
        (:class:`~pcee.inference.splits.SplitCheck`); None: every split is made
    fuse_bn, channels_last, compile : opt-in speed-ups, NOT bit-identical (see
        :mod:`pcee.inference.optimize`): they run a transformed copy of the model (``exec_model``), so
        later changes to ``model``'s weights do not reach it; ``compile`` compiles each segment on its
        first call (:meth:`warmup` runs them all once)
    graphs : CUDA graphs per segment and bucketed batch size (:mod:`pcee.inference.graphs`; eager
        replays on a CPU device); NOT bit-identical (batches run padded to their bucket)

    Unless an opt-in switch is on (:attr:`bit_identical`), the answers (exits, predictions, logits
    of the answering exit, confidences, expected accuracies) equal ``policy.decide`` on a full
    forward of the model on the same batches bit for bit (and, per sample, those of a full forward in
    any batches of ``min_rows`` rows or more when the batches are that large).
    """

    def __init__(
        self,
        model: MultiExitModel,
        policy: ExitPolicy,
        flops: np.ndarray,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        *,
        decide: str = "auto",
        min_rows: int = MIN_ROWS,
        regroup: int = REGROUP,
        profile: LatencyProfile | None = None,
        fuse_bn: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        graphs: bool = False,
    ) -> None:
        self.flops = _check_args(model, policy, flops, batch_size, decide, min_rows, regroup, compile and graphs)
        self.model, self.policy = model, policy
        self.batch_size, self.device = int(batch_size), torch.device(device)
        #: where the decisions run: "numpy" or "torch" ("auto" resolved by device)
        self.decide = decide if decide != "auto" else ("numpy" if self.device.type == "cpu" else "torch")
        self.min_rows, self.regroup = int(min_rows), int(regroup)
        self.fuse_bn, self.channels_last, self.compile = bool(fuse_bn), bool(channels_last), bool(compile)
        self.graphs = bool(graphs)
        self.model.to(self.device)
        from pcee.inference.optimize import compile_segments, prepare_model  # fx and dynamo load only here

        #: the model that runs: ``model`` itself, or its transformed copy when fuse_bn / channels_last is on
        self.exec_model = prepare_model(model, fuse_bn=self.fuse_bn, channels_last=self.channels_last)
        # every module of both models, for the cheap "already in eval mode" check of each run (a
        # module added to the model after this point is not checked)
        self._modules = tuple({id(m): m for net in (self.model, self.exec_model) for m in net.modules()}.values())
        eager = [functools.partial(self.exec_model.forward_segment, k) for k in range(model.num_exits)]
        graphed = self._graphed(eager) if self.graphs else None
        if self.compile:
            self._segments = compile_segments(self.exec_model)
        elif graphed is not None:
            self._segments = [functools.partial(graphed, k) for k in range(model.num_exits)]
        else:
            self._segments = eager
        self._stager = Stager(self.device, self.channels_last)
        self._device_path = DevicePath(
            model.num_exits,
            self.device,
            self.batch_size,
            self.min_rows,
            SplitCheck(_profile_for(profile, self.device)),
            self._stager,
            graphed.bucket if graphed is not None else None,
        )

    def _graphed(self, eager: list) -> GraphedSegments:
        capture = cuda_capture(torch.cuda.graph_pool_handle()) if self.device.type == "cuda" else eager_capture
        return GraphedSegments(eager, self.batch_size, capture)

    @property
    def score(self) -> str:
        """The confidence score of the served policy (its rule's; the answers' confidence columns)."""
        return self.policy.score

    @property
    def bit_identical(self) -> bool:
        """True unless an opt-in switch (fuse_bn, channels_last, compile, graphs) changes the float rounding."""
        return not (self.fuse_bn or self.channels_last or self.compile or self.graphs)

    @property
    def device_name(self) -> str:
        """Where the model runs: cpu, or cuda:<index> <device name>."""
        return device_name(self.device)

    @property
    def device_syncs(self) -> int:
        """Host reads of device values the torch decision path made so far (per exit of a window, and its end)."""
        return self._device_path.syncs

    # -- running ---------------------------------------------------------------------------------
    def _input(self, xb: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(xb, dtype=torch.float32).to(self.device)
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _eval(self) -> list[tuple[torch.nn.Module, bool]]:
        """Eval mode for a run; returns the modes to restore after it. Served models are in eval mode
        already, and then nothing is toggled: ``eval()`` and ``train()`` walk every module (~0.4 ms a
        call on the small CNN, as long as its forward pass on one sample)."""
        if not any(m.training for m in self._modules):
            return []
        modes = [(m, m.training) for m in self._modules]  # per module: a mixed state comes back as it was
        self.model.eval()
        self.exec_model.eval()
        return modes

    @staticmethod
    def _restore(modes: list[tuple[torch.nn.Module, bool]]) -> None:
        for m, training in modes:
            m.training = training

    def warmup(self, x: np.ndarray | torch.Tensor) -> None:
        """Run every segment once on ``x`` (a few samples): compiles them when ``compile`` is on; with
        ``graphs``, captures every segment at every bucket up to ``len(x)`` rows."""
        if not self.graphs:
            self._forward_all(x)
            return
        for rows in buckets(self.batch_size):
            if rows <= len(x):
                self._forward_all(x[:rows])

    def run(self, x: np.ndarray | torch.Tensor) -> ExitResult:
        """Answer every sample of ``x`` (N, C, H, W) with early exit."""
        n = int(x.shape[0])
        rule = self.policy.exit_rule()  # the policy as it is now (δ may have moved since the last run)
        check_score(rule.score)
        sheet = AnswerSheet(n, self.model.num_exits)
        modes = self._eval()
        try:
            with torch.inference_mode():
                if self.decide == "torch":
                    self._device_path.run(self.exec_model, self._segments, x, self._windows(n), rule, sheet)
                else:
                    for start, stop in self._windows(n):
                        if stop - start <= self.batch_size:
                            self._run_batch_host(self._input(x[start:stop]), start, stop - start, rule, sheet)
                        else:
                            self._run_window_host(x, start, stop, rule, sheet)
        finally:
            self._restore(modes)
        return sheet.result(self.flops)

    def _windows(self, n: int) -> list[tuple[int, int]]:
        """Row ranges run together: ``regroup`` batches each. A last batch under ``min_rows`` rows runs
        on its own: the full forward ran it on those few rows, whose kernels round differently."""
        bsz = self.batch_size
        out = [(s, min(s + self.regroup * bsz, n)) for s in range(0, n, self.regroup * bsz)]
        last_batch = n - (n - 1) // bsz * bsz if n else 0
        start, stop = out[-1] if out else (0, 0)
        if stop - start > bsz and last_batch < min(bsz, self.min_rows):
            out[-1:] = [(start, stop - last_batch), (stop - last_batch, stop)]
        return out

    def _run_batch_host(self, xb: torch.Tensor, start: int, b: int, rule: ExitRule, sheet: AnswerSheet) -> None:
        """One batch (rows ``start:start+b`` of the input), decisions in numpy."""
        alive = np.arange(start, start + b)  # global indices of samples still running
        rows: slice | np.ndarray = slice(start, start + b)  # the same rows, as a slice until the first compaction
        state: State = self.exec_model.initial_state(xb)
        for level in range(self.model.num_exits):
            state, keep = self._exit_host(level, state, alive, rows, rule, sheet)
            if keep is None:
                continue
            if keep.size == 0:
                return
            alive = rows = alive[keep]
            # compaction: later segments only see the survivors (padded up to min(b, min_rows))
            keep_t = torch.from_numpy(keep).to(self.device)
            state = index_state(state, pad_rows(keep_t, min(b, self.min_rows)))

    def _run_window_host(
        self, x: np.ndarray | torch.Tensor, start: int, stop: int, rule: ExitRule, sheet: AnswerSheet
    ) -> None:
        """Rows ``start:stop`` of the input, several batches run level by level, decisions in numpy: after
        each exit the survivors of the batches that lost samples are regrouped into full batches, so
        every segment runs on as many rows as a batch of the full forward (see ``regroup``)."""
        bsz = self.batch_size
        chunks: list[_Chunk] = [
            (
                self.exec_model.initial_state(self._input(x[s : min(s + bsz, stop)])),
                np.arange(s, min(s + bsz, stop)),
                slice(s, min(s + bsz, stop)),
            )
            for s in range(start, stop, bsz)
        ]
        for level in range(self.model.num_exits):
            going_on: list[_Chunk] = []
            thinned: list[tuple[State, torch.Tensor, np.ndarray]] = []  # (state, rows kept, their samples)
            for state, alive, rows in chunks:
                state, keep = self._exit_host(level, state, alive, rows, rule, sheet)
                if keep is None and alive.size == bsz:  # a full batch that nobody left: on as it is
                    going_on.append((state, alive, rows))
                elif keep is None or keep.size:
                    kept = np.arange(alive.size) if keep is None else keep
                    thinned.append((state, torch.from_numpy(kept).to(self.device), alive[kept]))
            going_on += self._regroup_host(thinned, min(bsz, self.min_rows))
            if not going_on:
                return
            chunks = going_on

    def _regroup_host(self, thinned: list[tuple[State, torch.Tensor, np.ndarray]], pad_to: int) -> list[_Chunk]:
        """The survivors of the thinned chunks in full batches (each row copied once), the last padded."""
        if len(thinned) == 1:  # nothing to regroup with: compacted as in a lone batch
            state, keep_t, alive = thinned[0]
            return [(index_state(state, pad_rows(keep_t, pad_to)), alive, alive)]
        if not thinned:
            return []
        merged = gather_states([(state, keep_t) for state, keep_t, _ in thinned])
        alive_all = np.concatenate([alive for _, _, alive in thinned])
        out: list[_Chunk] = []
        for s in range(0, alive_all.size, self.batch_size):
            alive = alive_all[s : s + self.batch_size]
            state = index_state(merged, slice(s, s + alive.size))  # a view
            if alive.size < pad_to:
                state = index_state(state, pad_rows(torch.arange(alive.size, device=self.device), pad_to))
            out.append((state, alive, alive))
        return out

    def _exit_host(
        self,
        level: int,
        state: State,
        alive: np.ndarray,
        rows: slice | np.ndarray,
        rule: ExitRule,
        sheet: AnswerSheet,
    ) -> tuple[State, np.ndarray | None]:
        """Segment ``level`` on ``state`` (the samples ``alive``, indexed as ``rows`` in the sheet; the
        state may carry padding rows after them), the exit decision, and the answers of those that leave.

        Returns the new state and ``keep``, the positions in ``alive`` of the samples that go on: None
        when all of them do, empty when none does (all left, or the last exit)."""
        state, zt = self._segments[level](state)
        n_alive = alive.size
        if zt.shape[0] != n_alive:  # padded survivor set: drop the copies' rows
            zt = zt[:n_alive]
        if zt.dtype != torch.float32:
            zt = zt.float()
        z = (zt if zt.device.type == "cpu" else zt.cpu()).numpy()  # (B_alive, K); a view on CPU
        s = confidence(z, rule.score)  # the one confidence pass of this exit
        sheet.confidences[rows, level] = s
        last = level == self.model.num_exits - 1
        if last:
            leave, expected = np.ones(n_alive, dtype=bool), rule.expected(level, z, s)
        else:
            leave, expected = rule.decide(level, z, s)
        n_leave = int(np.count_nonzero(leave))
        if n_leave:
            sheet.write_exit(rows, level, z, s, expected)
            if expected is None:  # a rule that computes it only for the leavers, as decide asks it
                sel = np.flatnonzero(leave)
                sheet.write_expected(alive[sel], rule.expected(level, z[sel], s[sel]))
        if last or n_leave == n_alive:
            return state, _NONE_GO_ON
        if n_leave == 0:
            return state, None
        return state, np.flatnonzero(~leave)

    def _forward_all(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits (N, L, K) float32 of every exit, batch by batch."""
        chunks = []
        modes = self._eval()
        try:
            with torch.inference_mode():
                for start in range(0, int(x.shape[0]), self.batch_size):
                    b = min(self.batch_size, int(x.shape[0]) - start)
                    state: State = self.exec_model.initial_state(self._input(x[start : start + b]))
                    logits = []
                    for segment in self._segments:
                        state, z = segment(state)
                        logits.append(z[:b].float())
                    chunks.append(torch.stack(logits, dim=1).cpu().numpy())
        finally:
            self._restore(modes)
        return np.concatenate(chunks, axis=0)

    def run_all_exits(self, x: np.ndarray | torch.Tensor) -> AllExits:
        """Run every sample of ``x`` (N, C, H, W) to the final exit, no early exit (shadow runs)."""
        x = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.shape[0] == 0:
            num_exits = self.model.num_exits
            return AllExits(np.zeros((0, num_exits, 0), np.float32), np.zeros((0, num_exits)), np.zeros(0, np.int64))
        logits = self._forward_all(np.ascontiguousarray(x))
        conf = np.stack([confidence(logits[:, level], self.score) for level in range(logits.shape[1])], axis=1).astype(
            np.float64
        )
        return AllExits(logits, conf, logits[:, -1].argmax(axis=1).astype(np.int64))


_NONE_GO_ON = np.zeros(0, dtype=np.int64)


def _check_args(
    model: MultiExitModel,
    policy: ExitPolicy,
    flops: np.ndarray,
    batch_size: int,
    decide: str,
    min_rows: int,
    regroup: int,
    compile_and_graphs: bool,
) -> np.ndarray:
    """ValueError naming the first bad argument; returns ``flops`` as float64."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    flops = np.asarray(flops, dtype=np.float64)
    if flops.shape != (model.num_exits,):
        raise ValueError(
            f"flops must be ({model.num_exits},) for a model with {model.num_exits} exits, got shape {flops.shape}"
        )
    if policy.decides_with_labels:
        raise ValueError(
            f"policy {policy.name!r} needs labels to decide and cannot run early exit; choose a deployable policy"
        )
    check_score(policy.score)
    if decide not in DECIDE_MODES:
        raise ValueError(f"decide must be one of {', '.join(DECIDE_MODES)}, got {decide!r}")
    if int(min_rows) < 0:
        raise ValueError(f"min_rows must be >= 0, got {min_rows}")
    if int(regroup) < 1:
        raise ValueError(f"regroup must be >= 1 (1: every batch on its own), got {regroup}")
    if compile_and_graphs:
        raise ValueError("compile and graphs are two ways to cut launch overhead: choose one")
    return flops


def _profile_for(profile: LatencyProfile | None, device: torch.device) -> LatencyProfile | None:
    """``profile`` when it was measured on this kind of device, else None (a CPU profile says nothing
    about a GPU's splits)."""
    if profile is None:
        return None
    return profile if profile.device.split(":")[0] == device.type else None

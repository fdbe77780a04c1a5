"""Per-exit cost in time: latency profiles measured on the serving machine.

FLOPs predict time badly for early-exit networks on a CPU: an early MSDNet segment does little
arithmetic but many small convolutions, so an operating point chosen on FLOPs can promise a saving
the server does not deliver. A :class:`LatencyProfile` is what one sample costs, in seconds, to
be answered at each exit (cumulative, like ``ExitOutputs.flops``), at the batch sizes the server
uses. Any cumulative per-exit cost can stand where FLOPs stand (the sweep, the operating point's
budget and relative cost, the reports): :meth:`LatencyProfile.cost` is that vector, and
``ExitOutputs.with_cost`` swaps it in.

What is timed (``method``):

- ``"runner"`` (the default, what ``pcee profile`` stores): the served path. For each exit l, the
  :class:`~pcee.inference.runner.EarlyExitRunner` answers a batch whose every sample leaves at l:
  segments 0..l with their exit heads, the confidence pass and decision after each, the answer
  bookkeeping and the call's own fixed cost; plus, for each exit before l, the copy of the
  survivors' hidden state a mixed batch makes there (:class:`_AnswerAt`).
  A small model's decisions are a noticeable share of its early segments (the 8x8 small CNN at
  batch 256: ~0.06 ms of numpy for the first exit's decision and answer against a ~1 ms first
  segment), and a profile without them promises the early exits a saving the runner does not
  deliver. The decisions are timed with a score threshold; a reliability-map lookup costs a few µs
  more per exit. What a per-sample cost cannot hold: a call's fixed costs at an exit (a segment's
  module calls, the numpy calls of a decision) are the same for the few survivors of a thinned
  batch as for a full batch. The runner keeps batches full where the input has several
  (``EarlyExitRunner(regroup=...)``); a lone thinned batch (a served micro-batch) costs a little
  more than predicted. (Timing a mixed batch itself, one sample leaving at each earlier exit,
  measured worse in ``benchmarks/inference_speed.py``: MSDNet's pure mixes delivered ~5 % less than
  it promised them, eff.t 0.87 against 0.93 with this method.)
- ``"segments"``: each segment with its exit head alone (``forward_segment``), summed: the model's
  own time, what a runner with free decisions would cost.

Timing is on whatever machine runs :func:`measure_exit_latency` (``pcee profile``): measure where
you serve. Each of ``repeats`` timed passes (after ``warmup`` untimed ones) times a plain forward of
the model first, ``plain_s``, the time early exit is measured against, then every exit. ``plain_s``
is the median of the plain forwards; an exit's time is the median of its ratios to its pass's plain
forward times ``plain_s``, so that cost over plain, what a speed-up prediction divides, is a ratio
measured side by side and a machine's drift between passes cancels. torch's thread count is recorded
with the profile.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pcee.calibration.scores import check_score
from pcee.inference.device import device_name
from pcee.inference.runner import EarlyExitRunner
from pcee.models.base import MultiExitModel, State, index_state
from pcee.policies.estimator import ALWAYS, NEVER, FittedThresholdPolicy

if TYPE_CHECKING:
    from pcee.inference.runner import EarlyExitRunner, ExitResult

#: batch sizes profiled by default: a lone request, a small and a full micro-batch (``pcee serve --max-batch`` 64)
DEFAULT_BATCH_SIZES = (1, 8, 64)
COSTS = ("flops", "latency")
METHODS = ("runner", "segments")


@dataclass(frozen=True)
class LatencyProfile:
    """Cumulative seconds per sample to reach each exit, per profiled batch size.

    ``per_sample_s[b, l]``: at batch size ``batch_sizes[b]``, the time to answer a batch at exit
    ``l`` divided by the batch size: with ``method`` "runner", the early-exit runner's whole call
    for a batch that leaves at ``l``; with "segments" (and profiles stored before ``method``
    existed), segments 0..l with their exit heads alone. Non-decreasing in ``l``.

    ``plain_s[b]``: a plain forward of the model (``model(x)``, no early exit) per sample at the same
    batch size, timed beside it (None in profiles stored before it was): the time early exit is
    measured against. Answering at the last exit costs the runner its decisions on top of it, so
    ``per_sample_s[b, -1] / plain_s[b]`` is early exit's own overhead, and ``plain_s / cost`` the
    speed-up over serving without early exit (:meth:`speedup`).
    """

    batch_sizes: tuple[int, ...]
    per_sample_s: np.ndarray  # (B, L) float64
    threads: int
    repeats: int
    machine: str
    method: str = "runner"
    plain_s: np.ndarray | None = None  # (B,) float64
    #: where it was timed: "cpu", or "cuda:<index> <device name>" (profiles stored before it was recorded: "cpu")
    device: str = "cpu"

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
        if self.method not in METHODS:
            raise ValueError(f"unknown latency profile method {self.method!r}; valid: {', '.join(METHODS)}")
        object.__setattr__(self, "per_sample_s", arr)
        if self.plain_s is not None:
            plain = np.asarray(self.plain_s, dtype=np.float64)
            if plain.shape != (len(self.batch_sizes),) or not np.all(np.isfinite(plain)) or np.any(plain <= 0):
                raise ValueError(
                    f"plain_s must be ({len(self.batch_sizes)},) finite values > 0, one per batch size, got {plain.tolist()}"
                )
            object.__setattr__(self, "plain_s", plain)

    @property
    def num_exits(self) -> int:
        return self.per_sample_s.shape[1]

    def _row(self, batch_size: int | None) -> int:
        """The profiled batch size nearest ``batch_size`` (default the largest, the micro-batches a
        loaded server runs)."""
        if batch_size is None:
            return int(np.argmax(self.batch_sizes))
        return int(np.argmin([abs(b - batch_size) for b in self.batch_sizes]))

    def cost(self, batch_size: int | None = None) -> np.ndarray:
        """(L,) cumulative seconds per sample at ``batch_size`` (the nearest profiled one; default the largest)."""
        return self.per_sample_s[self._row(batch_size)].copy()

    def plain(self, batch_size: int | None = None) -> float | None:
        """Seconds per sample of a plain forward (no early exit) at ``batch_size``, or None when not profiled."""
        return None if self.plain_s is None else float(self.plain_s[self._row(batch_size)])

    def speedup(self, mean_cost_s: float, batch_size: int | None = None) -> float:
        """Predicted speed-up over a plain forward of samples whose mean cost (from :meth:`cost`) is
        ``mean_cost_s`` seconds: the plain forward's time over it. Without a profiled plain forward the
        last exit's cost stands for it, which leaves the runner's own overhead there out of the prediction."""
        plain = self.plain(batch_size)
        return (self.cost(batch_size)[-1] if plain is None else plain) / float(mean_cost_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "per_sample_s": self.per_sample_s.tolist(),
            "threads": self.threads,
            "repeats": self.repeats,
            "machine": self.machine,
            "method": self.method,
            "device": self.device,
            **({} if self.plain_s is None else {"plain_s": self.plain_s.tolist()}),
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
                method=str(d.get("method", "segments")),  # profiles stored before "method" timed segments
                plain_s=None if d.get("plain_s") is None else np.asarray(d["plain_s"], dtype=np.float64),
                device=str(d.get("device", "cpu")),  # profiles stored before it was recorded were timed on CPU
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
        if self.plain_s is not None:
            cells = [f"{1000 * p:.4f}" for p in self.plain_s]
            lines.append(
                "| plain forward (no early exit) | "
                + " | ".join(cells)
                + f" | {self.plain() / self.cost()[-1]:.3f} |"
                + (" |" if flops is not None else "")
            )
            over = ", ".join(
                f"{100 * (self.per_sample_s[b, -1] / self.plain_s[b] - 1):+.1f} % at batch {size}"
                for b, size in enumerate(self.batch_sizes)
            )
            lines.append("")
            lines.append(f"Answering at the last exit costs the {self.method} timing {over} over a plain forward.")
        return "\n".join(lines)


def measure_exit_latency(
    model: MultiExitModel,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    repeats: int = 20,
    warmup: int = 3,
    seed: int = 0,
    *,
    method: str = "runner",
    score: str = "max_prob",
    runner_options: dict[str, Any] | None = None,
) -> LatencyProfile:
    """Time ``model`` on random inputs of ``input_shape`` (C, H, W) at each batch size, on the device
    the model is on; the profile is the median per sample, cumulative over the exits (see the module
    docstring for ``method``). On CUDA every timed call ends with a synchronisation.

    ``score`` is the confidence score the runner computes at each exit (the served policy's: the
    scores differ in cost); ``runner_options`` are the served runner's keyword options (``graphs``,
    ``decide``, ...), so that the runner is timed as it serves.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    check_score(score)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters(), torch.empty(0)).device  # time where the model is
    rows, plain = [], []
    try:
        with torch.inference_mode():
            for b in sizes:
                x = torch.rand((b, *input_shape), generator=gen).to(device)
                calls = _runner_calls(model, x, score, runner_options or {}) if method == "runner" else None
                per_sample, plain_s = _profile_batch(model, x, calls, repeats, warmup)
                rows.append(per_sample)
                plain.append(plain_s)
    finally:
        model.train(was_training)
    return LatencyProfile(
        sizes,
        np.stack(rows),
        torch.get_num_threads(),
        repeats,
        _machine(),
        method,
        np.asarray(plain),
        device_name(device),
    )


def _profile_batch(
    model: MultiExitModel, x: torch.Tensor, calls: list[_AnswerAt] | None, repeats: int, warmup: int
) -> tuple[np.ndarray, float]:
    """(cumulative seconds per sample at each exit, plain forward's seconds per sample) at ``x``'s batch size."""
    b, clock = int(x.shape[0]), _clock(x.device)
    times = np.empty((repeats, model.num_exits))
    plain_times = np.empty(repeats)
    for r in range(warmup + repeats):
        t0 = clock()
        model(x)  # the plain forward early exit is measured against, first in each pass
        plain_time = clock() - t0
        lap = _lap(model, x, calls, clock)
        if r >= warmup:
            times[r - warmup] = lap
            plain_times[r - warmup] = plain_time
    # each exit's time as a median of its ratios to the pass's plain forward, scaled by the plain
    # forward's median: a shared machine's speed drifts between passes, and what a prediction divides is
    # exit cost by plain time, so that ratio is measured side by side (scratch timing, 8x8 CNN, 8
    # profiles of 28 passes: last exit / plain 1.02-1.13 with the medians taken apart, 1.02-1.04 paired)
    plain_med = float(np.median(plain_times))
    med = np.median(times / plain_times[:, None], axis=0) * plain_med
    # "runner" times each exit's whole call: cumulative already, up to noise between exits whose extra
    # work is tiny (kept non-decreasing); "segments" times each segment alone
    return (np.maximum.accumulate(med) if calls is not None else np.cumsum(med)) / b, plain_med / b


def _lap(
    model: MultiExitModel, x: torch.Tensor, calls: list[_AnswerAt] | None, clock: Callable[[], float]
) -> list[float]:
    """Seconds per exit in one pass: one runner call per exit, each answering the whole batch there, or
    each segment alone."""
    lap = []
    if calls is not None:
        for call in calls:
            t0 = clock()
            call()
            lap.append(clock() - t0)
        return lap
    state = model.initial_state(x)
    for k in range(model.num_exits):
        t0 = clock()
        state, _ = model.forward_segment(k, state)
        lap.append(clock() - t0)
    return lap


def _clock(device: torch.device) -> Callable[[], float]:
    """``time.perf_counter``, read after the device's queued work has finished (CUDA runs asynchronously)."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or platform.system()}".strip()


class _LeaveAt(FittedThresholdPolicy):
    """Every sample leaves at exit ``level``: thresholds NEVER before it, ALWAYS from it on. A score
    threshold, so the runner applies it itself, as it does the library's policies."""

    name = "leave-at"
    param_name = ""

    def __init__(self, level: int = 0, num_exits: int = 1, score: str = "max_prob") -> None:
        self.level = level
        self.num_exits = num_exits
        self.score = score
        self.thresholds_ = np.where(np.arange(num_exits) < level, NEVER, ALWAYS)
        self.num_exits_ = num_exits


class _AnswerAt:
    """One timed call of the "runner" method for exit ``level``: the runner answers the whole batch
    there, then the survivors' hidden state is copied once at each exit before it (``compact``).

    In served traffic a batch is mixed: at most exits some samples leave and the runner copies the
    survivors' state (``index_state``) for the next segment. A batch that all leaves at one exit never
    does, so that copy is timed here on its own, on every row: one row's copy per exit passed is what
    a sample answered at ``level`` adds, and the per-sample division counts it.
    """

    def __init__(self, runner: EarlyExitRunner, xs: np.ndarray, compact: list[State]) -> None:
        self.runner, self.xs, self.compact = runner, xs, compact
        self.rows = torch.arange(len(xs), device=runner.device)

    def __call__(self) -> ExitResult:
        result = self.runner.run(self.xs)
        for state in self.compact:
            index_state(state, self.rows)
        return result


def _runner_calls(
    model: MultiExitModel, x: torch.Tensor, score: str, runner_options: dict[str, Any] | None = None
) -> list[_AnswerAt]:
    """Per exit l, a call of the runner answering all of ``x`` (one batch) at exit l, as served
    (numpy input, on ``x``'s device with the runner's default decisions there, ``runner_options``),
    with the survivors' state compacted at each exit before l."""

    num_exits = model.num_exits
    xs = x.cpu().numpy()
    flops = np.arange(1.0, num_exits + 1.0)  # unused by the timing; the runner needs a (L,) vector
    states: list[State] = []  # the state after segment j, which the survivors of exit j carry on with
    with torch.inference_mode():
        state = model.initial_state(x)
        for j in range(num_exits - 1):
            state, _ = model.forward_segment(j, state)
            states.append(state)
    return [
        _AnswerAt(
            EarlyExitRunner(
                model,
                _LeaveAt(k, num_exits, score),
                flops,
                batch_size=len(xs),
                device=x.device,
                **(runner_options or {}),
            ),
            xs,
            states[:k],
        )
        for k in range(num_exits)
    ]


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


def speedup_line(profile: LatencyProfile, mean_cost_s: float) -> str:
    """One line for an operating point's report: its predicted speed-up over a plain forward (a point
    estimate from the profile and the point's mean cost per sample on calibrate rows)."""
    if profile.plain() is None:
        return (
            f"predicted speed-up over answering at the last exit: {profile.speedup(mean_cost_s):.2f}x "
            "(point estimate; this profile has no plain forward: re-run pcee profile to compare with one)"
        )
    plain, last = profile.plain(), profile.cost()[-1]
    assert plain is not None
    return (
        f"predicted speed-up over a plain forward (no early exit): {profile.speedup(mean_cost_s):.2f}x (point estimate: "
        f"{1000 * plain:.4f} over {1000 * mean_cost_s:.4f} ms per sample at batch {max(profile.batch_sizes)}; "
        f"answering at the last exit costs {100 * (last / plain - 1):+.1f} % over a plain forward)"
    )


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

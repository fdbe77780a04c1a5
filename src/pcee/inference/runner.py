"""Early-exit inference that really skips the work of samples that already left.

The model runs segment by segment (``forward_segment``). After each non-final segment the policy
decides, from that exit's logits alone, which samples leave; only the survivors' hidden state is
kept (``index_state``), so later segments run on a smaller batch. The answers equal "compute
every exit, then ``policy.decide``" because the policy's per-exit rule sees the same logits.

What keeps the answers bit-identical to that reference, and cheap:

- *The policy's rule, read once per run* (:class:`PolicyRule`). For the library's policies
  (threshold, temperature, msdnet-budget, EERO: a score threshold; PCEE, PCEE-WS, risk-controlled:
  a reliability-map lookup) the runner applies the rule itself to one confidence pass per exit and
  reuses that pass for the answer columns (the old runner computed the softmax three times per
  exit). Any other policy is asked ``exit_mask`` / ``expected_accuracy`` as before.
- *Where the decisions run* (``decide``). ``"numpy"`` (the default on CPU): the rule in numpy on the
  exit's logits, the same numpy calls the policy makes, so equal by construction; the bookkeeping
  stays in numpy (on CPU a tensor's ``.numpy()`` is a view, nothing travels). ``"torch"`` (the
  default on other devices): the rule on the device in float64 (:class:`TorchRule`), nothing leaves
  the device per exit but the leave count; its score can differ from numpy's in the last bits
  (about 1e-15), so a sample whose decision could change within ``SCORE_GUARD`` (a threshold or a
  bin edge that close, or a non-finite score) is decided by ``policy.exit_mask`` in numpy. The
  logits of every computed exit go to a pre-allocated (batch, L, K) device buffer and the answer
  columns are computed from it in numpy once per batch. On CPU this path measured slower than
  numpy (many tiny torch ops); it is there for accelerators.
- *No tiny survivor sets.* CPU kernels (MKL GEMM, oneDNN convolution) sum in another order below
  about 16 rows, so a sample's logits would change when only a few others survive with it. Survivor
  sets are padded with copies of a surviving row (their outputs are dropped) up to
  ``min(batch rows, min_rows)``: every segment runs on as many rows as a full forward of the batch
  would, or on at least ``min_rows``, where the kernels give each row the same result. A batch is
  never padded itself (a one-sample request costs one row).
- *Full batches* (``regroup``). A segment call has fixed costs that a thinned batch pays for fewer
  samples. An input of several batches runs up to ``regroup`` of them together, exit by exit; after
  each exit the survivors of the batches that lost samples are copied into full batches
  (:func:`~pcee.models.base.gather_states`). A row's result does not depend on the other rows of a
  batch of ``min_rows`` rows or more, so the answers stay those of the full forward in the input's
  batches; a last batch under ``min_rows`` rows runs on its own, as the full forward ran it.
- *No selection of the leavers.* At an exit where some samples leave, every running sample's answer
  columns are written; those that go on are overwritten at their own exit, and the predictions are
  the answering logits' argmax, taken once per run.

Opt-in, *not* bit-identical (logits move by float rounding, so exits can differ at near-ties):
``fuse_bn``, ``channels_last`` and ``compile`` (:mod:`pcee.inference.optimize`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from pcee.calibration.reliability_map import ExitReliabilityMaps, ReliabilityMap
from pcee.calibration.scores import SCORES, confidence
from pcee.models.base import MultiExitModel, State, gather_states, index_state
from pcee.policies.base import ExitPolicy
from pcee.policies.estimator import FittedThresholdPolicy, PolicyEstimator
from pcee.policies.pcee import PCEEPolicy
from pcee.policies.threshold import ThresholdPolicy
from pcee.selective import decisions

#: a torch float64 score is within this of numpy's for the same float32 logits (observed: <= 1e-15 for
#: K up to 1000); decisions that could change within it are left to the policy in numpy
SCORE_GUARD = 1e-9
#: survivor sets are padded up to min(batch rows, MIN_ROWS) (CPU kernels are batch-size invariant from here up)
MIN_ROWS = 16
#: batches run together, their survivors regrouped into full batches after each exit (EarlyExitRunner ``regroup``)
REGROUP = 4
DECIDE_MODES = ("auto", "numpy", "torch")


@dataclass
class ExitResult:
    """Per-sample answers of an early-exit run (numpy arrays, N samples, L exits).

    prediction : (N,) int64 predicted class
    exit : (N,) int64 exit that answered, 0-based
    confidence : (N,) float64 the policy's confidence score at that exit
    expected_accuracy : (N,) float64 ``policy.expected_accuracy`` at that exit (the map value for PCEE)
    flops : (N,) float64 cumulative F_exit spent on the sample
    confidences : (N, L) float64 score of every exit computed for the sample, NaN after its exit
    logits : (N, K) float32 logits of the exit that answered (None where a runner does not keep them)
    """

    prediction: np.ndarray
    exit: np.ndarray
    confidence: np.ndarray
    expected_accuracy: np.ndarray
    flops: np.ndarray
    confidences: np.ndarray
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.prediction.shape[0])

    def answer_columns(self, threshold: float, mode: str) -> dict[str, np.ndarray]:
        """The answer rule's per-sample columns (:func:`answer_columns`) for these answers."""
        return answer_columns(self.expected_accuracy, threshold, mode)


def answer_columns(expected_accuracy: np.ndarray, threshold: float, mode: str) -> dict[str, np.ndarray]:
    """Per-sample columns of the answer rule ρ = ``threshold`` under ``mode`` (pcee.selective), the
    one place the service's answers and the pyfunc model's rows get them from:

    decision : (N,) object, ``answered`` / ``abstained`` / ``deferred`` (before any forwarding)
    answered, abstained, deferred : (N,) bool, one-hot of ``decision``
    answer_threshold : (N,) float64, ρ
    """
    d = decisions(expected_accuracy, threshold, mode)
    return {
        "decision": d,
        "answered": d == "answered",
        "abstained": d == "abstained",
        "deferred": d == "deferred",
        "answer_threshold": np.full(d.shape, float(threshold), dtype=np.float64),
    }


@dataclass
class AllExits:
    """Every exit of a full run (what a shadow request pays for).

    logits : (N, L, K) float32
    confidences : (N, L) float64 the runner's confidence score at every exit
    final_prediction : (N,) int64 argmax of the final exit
    """

    logits: np.ndarray
    confidences: np.ndarray
    final_prediction: np.ndarray

    def __len__(self) -> int:
        return int(self.final_prediction.shape[0])


def policy_score(policy: ExitPolicy) -> str:
    """The confidence score a policy uses (max_prob for policies without one)."""
    get_params = getattr(policy, "get_params", None)
    params = cast(dict[str, Any], get_params()) if callable(get_params) else {}  # get_params: the sklearn-style dict
    return str(params.get("score", getattr(policy, "score", "max_prob")))


def torch_score(z: torch.Tensor, score: str) -> torch.Tensor:
    """Confidence (B,) float64 of logits (B, K) in torch, by the formulas of :mod:`pcee.calibration.scores`.

    Not bit-identical to numpy's (exp and the sums round differently, about 1e-15); :class:`TorchRule`
    leaves every decision that close to a boundary to numpy.
    """
    z = z.double()
    k = z.shape[-1]
    if score == "max_prob":  # numpy's max_k p_k is 1 / sum(exp(z - max z)): the largest term is exp(0) = 1
        return 1.0 / torch.exp(z - z.amax(dim=-1, keepdim=True)).sum(dim=-1)
    if k < 2:
        return torch.ones(z.shape[:-1], dtype=torch.float64, device=z.device)
    p = torch.softmax(z, dim=-1)
    if score == "entropy":
        h = -torch.special.xlogy(p, p).sum(dim=-1)
        return (1.0 - h / math.log(k)).clamp(0.0, 1.0)
    top2 = p.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@dataclass
class PolicyRule:
    """A library policy's per-exit rule, read from its state when a run starts.

    Threshold kind (threshold, temperature, msdnet-budget, EERO): the policy's score at exit l is
    ``confidence(z, score)`` (``confidence(z / T_l, score)`` for temperature scaling); it is the
    expected accuracy, and samples leave where it reaches ``thresholds[l]``. Map kind (PCEE, PCEE-WS,
    risk-controlled): the expected accuracy is ``maps[l].predict(confidence(z, score))`` and samples
    leave where it reaches ``served``. :meth:`leave` and :meth:`expected` make the same numpy calls
    on the same values as the policy's ``exit_mask`` and ``expected_accuracy``, so they are equal by
    construction; they take the runner's one confidence pass ``s = confidence(z, score)``.
    """

    score: str
    thresholds: list[float] | None = None
    temperatures: list[float] | None = None
    maps: list[ReliabilityMap] | None = None
    served: float = float("nan")

    @classmethod
    def of(cls, policy: ExitPolicy, num_exits: int, score: str) -> PolicyRule | None:
        """The rule of ``policy`` for ``num_exits`` exits and the runner's ``score``; None: ask the policy.

        Only policies whose ``exit_mask`` and ``expected_accuracy`` (and score) are the library's own
        get a rule; a subclass that overrides any of them is asked, as is an unfitted policy (which then
        raises its own error).
        """
        if not isinstance(policy, PolicyEstimator) or not policy.is_fitted or num_exits < 1:
            return None
        if getattr(policy, "num_exits_", None) != num_exits or getattr(policy, "score", None) != score:
            return None
        if score not in SCORES:
            return None
        kind = type(policy)
        if isinstance(policy, ThresholdPolicy):
            from pcee.policies.temperature import TemperaturePolicy

            if kind.exit_mask is not ThresholdPolicy.exit_mask:
                return None
            if kind.expected_accuracy is not ThresholdPolicy.expected_accuracy:
                return None
            scores = getattr(kind, "_scores", None)
            temperatures = None
            if scores is TemperaturePolicy._scores:
                temps = np.asarray(getattr(policy, "temperatures_", None), dtype=np.float64)
                if temps.shape != (num_exits,):
                    return None
                temperatures = [float(t) for t in temps]
            elif scores is not ThresholdPolicy._scores:
                return None
            return cls(score, thresholds=[float(policy.tau)] * num_exits, temperatures=temperatures)
        if isinstance(policy, FittedThresholdPolicy):
            if kind.exit_mask is not FittedThresholdPolicy.exit_mask:
                return None
            if kind.expected_accuracy is not FittedThresholdPolicy.expected_accuracy:
                return None
            thresholds = np.asarray(policy.thresholds_, dtype=np.float64)
            if thresholds.shape != (num_exits,):
                return None
            return cls(score, thresholds=[float(t) for t in thresholds])
        if isinstance(policy, PCEEPolicy):
            if kind.exit_mask is not PCEEPolicy.exit_mask or kind.expected_accuracy is not PCEEPolicy.expected_accuracy:
                return None
            maps = getattr(policy, "maps_", None)
            if type(maps) is not ExitReliabilityMaps or maps.score != score or len(maps) < num_exits:
                return None
            levels = [maps[level] for level in range(num_exits)]
            if any(type(m) is not ReliabilityMap or not hasattr(m, "acc_") for m in levels):
                return None
            return cls(score, maps=levels, served=float(policy.served_threshold()))
        return None

    def expected(self, level: int, z: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``policy.expected_accuracy(level, z)`` (B,), given ``s = confidence(z, score)``."""
        if self.maps is not None:
            return self.maps[level].predict(s)
        if self.temperatures is not None:
            return confidence(np.asarray(z, dtype=np.float64) / self.temperatures[level], self.score)
        return s

    def leave(self, level: int, z: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(``policy.exit_mask(level, z)``, ``policy.expected_accuracy(level, z)``), (B,) each."""
        e = self.expected(level, z, s)
        if self.maps is not None:
            return e >= self.served, e
        assert self.thresholds is not None
        return e >= self.thresholds[level], e


@dataclass
class _MapLevel:
    """One exit's reliability map as tensors: interior bin edges and "the map value reaches the served threshold" per bin."""

    binning: str
    n_bins: int
    interior: torch.Tensor  # (B-1,) float64
    passes: torch.Tensor  # (B,) bool


class TorchRule:
    """A :class:`PolicyRule`'s decisions on the device.

    ``leave(level, z)`` returns the decision and the rows where it is *unsure*: the torch score lies
    within ``guard`` of a threshold or a bin edge, or is not finite. The runner asks ``policy.exit_mask``
    in numpy for those rows, so the decisions always equal numpy's (the rules are row-wise, and
    monotone in the score between edges: a numpy score within ``guard`` of the torch one decides the
    same).
    """

    def __init__(self, rule: PolicyRule, device: torch.device, guard: float | None = None) -> None:
        self.score = rule.score
        self.thresholds = rule.thresholds
        self.temperatures = rule.temperatures
        self.maps: list[_MapLevel] | None = None
        if rule.maps is not None:
            self.maps = []
            for m in rule.maps:
                edges = np.asarray(m.edges_, dtype=np.float64)
                self.maps.append(
                    _MapLevel(
                        str(m.binning),
                        int(m.n_bins),
                        torch.as_tensor(np.ascontiguousarray(edges[1:-1]), device=device),
                        torch.as_tensor(np.asarray(m.acc_) >= rule.served, device=device),  # numpy's comparison
                    )
                )
        self.guard = SCORE_GUARD if guard is None else float(guard)

    def _bin(self, m: _MapLevel, s: torch.Tensor) -> torch.Tensor:
        s = torch.nan_to_num(s, nan=0.0)  # as ReliabilityMap.bin_index
        if m.binning == "equal_width":
            idx = torch.floor(s * m.n_bins)
        else:
            idx = torch.searchsorted(m.interior, s, right=True)
        return idx.clamp(0, m.n_bins - 1).long()

    def leave(self, level: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(leave, unsure), bool (B,) each, for the logits (B, K) of non-final exit ``level``."""
        zz = z.double()
        if self.temperatures is not None:
            zz = zz / self.temperatures[level]
        s = torch_score(zz, self.score)
        g = self.guard
        if self.maps is not None:
            m = self.maps[level]
            lo, hi = self._bin(m, s - g), self._bin(m, s + g)  # bins are monotone in s
            return m.passes[lo], (lo != hi) | ~torch.isfinite(s)
        assert self.thresholds is not None
        thr = self.thresholds[level]
        return s >= thr, ((s - thr).abs() <= g) | ~torch.isfinite(s)


_NONE_GO_ON = np.zeros(0, dtype=np.int64)


def _pad_rows(index: torch.Tensor, min_rows: int) -> torch.Tensor:
    """``index`` followed by copies of its first entry, up to ``min_rows`` entries."""
    short = min_rows - int(index.numel())
    return index if short <= 0 else torch.cat([index, index[:1].expand(short)])


class EarlyExitRunner:
    """Batched early-exit inference of a multi-exit model under an exit policy.

    Parameters
    ----------
    model : MultiExitModel
    policy : fitted ExitPolicy whose ``exit_mask`` works without labels (every policy but the oracle)
    flops : (L,) cumulative F_l reported per sample
    batch_size : samples per forward pass
    device : torch device for the model and inputs
    decide : where the exit decisions run (the answers are the same): "numpy" after each segment
        (the default on CPU), "torch" on the device with device-side bookkeeping (the default
        elsewhere), "auto" picks by device (see the module docstring)
    min_rows : survivor sets are padded with copies of a surviving row up to ``min(batch rows, min_rows)``,
        so that no segment runs on fewer rows than the full forward's kernels saw (0: never pad)
    regroup : with numpy decisions, an input of several batches runs up to this many batches at a
        time, exit by exit, and after each exit the survivors of the batches that lost samples are
        regrouped into full batches (1: every batch on its own). A segment call has fixed costs (its
        modules' calls, the decision's numpy calls) that a thinned batch pays in full for fewer
        samples; regrouped, the segments run on full batches, as the latency profile times them.
        Costs the hidden state of up to this many batches at once. A lone batch (a served
        micro-batch) runs as before.
    fuse_bn, channels_last, compile : opt-in speed-ups, NOT bit-identical (see
        :mod:`pcee.inference.optimize`): they run a transformed copy of the model (``exec_model``), so
        later changes to ``model``'s weights do not reach it; ``compile`` compiles each segment on its
        first call (:meth:`warmup` runs them all once)

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
        fuse_bn: bool = False,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        flops = np.asarray(flops, dtype=np.float64)
        if flops.shape != (model.num_exits,):
            raise ValueError(
                f"flops must be ({model.num_exits},) for a model with {model.num_exits} exits, got shape {flops.shape}"
            )
        if getattr(policy, "name", "") == "oracle":
            raise ValueError("the oracle needs labels and cannot run early exit; choose a deployable policy")
        if decide not in DECIDE_MODES:
            raise ValueError(f"decide must be one of {', '.join(DECIDE_MODES)}, got {decide!r}")
        if int(min_rows) < 0:
            raise ValueError(f"min_rows must be >= 0, got {min_rows}")
        if int(regroup) < 1:
            raise ValueError(f"regroup must be >= 1 (1: every batch on its own), got {regroup}")
        self.model = model
        self.policy = policy
        self.flops = flops
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.score = policy_score(policy)
        #: where the decisions run: "numpy" or "torch" ("auto" resolved by device)
        self.decide = decide if decide != "auto" else ("numpy" if self.device.type == "cpu" else "torch")
        self.min_rows = int(min_rows)
        self.regroup = int(regroup)
        self.fuse_bn, self.channels_last, self.compile = bool(fuse_bn), bool(channels_last), bool(compile)
        self.model.to(self.device)
        from pcee.inference.optimize import compile_segments, prepare_model

        #: the model that runs: ``model`` itself, or its transformed copy when fuse_bn / channels_last is on
        self.exec_model = prepare_model(model, fuse_bn=self.fuse_bn, channels_last=self.channels_last)
        # every module of both models, for the cheap "already in eval mode" check of each run (a
        # module added to the model after this point is not checked)
        self._modules = tuple({id(m): m for net in (self.model, self.exec_model) for m in net.modules()}.values())
        self._segments = (
            compile_segments(self.exec_model)
            if self.compile
            else [functools.partial(self.exec_model.forward_segment, k) for k in range(model.num_exits)]
        )

    @property
    def bit_identical(self) -> bool:
        """True unless an opt-in switch (fuse_bn, channels_last, compile) changes the float rounding."""
        return not (self.fuse_bn or self.channels_last or self.compile)

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
        """Run every segment once on ``x`` (a few samples): compiles them when ``compile`` is on."""
        self._forward_all(x)

    def run(self, x: np.ndarray | torch.Tensor) -> ExitResult:
        """Answer every sample of ``x`` (N, C, H, W) with early exit."""
        n = int(x.shape[0])
        num_exits = self.model.num_exits
        out: dict[str, np.ndarray] = {
            "prediction": np.zeros(n, dtype=np.int64),
            "exit": np.zeros(n, dtype=np.int64),
            "confidence": np.zeros(n, dtype=np.float64),
            "expected_accuracy": np.zeros(n, dtype=np.float64),
            "confidences": np.full((n, num_exits), np.nan, dtype=np.float64),
        }
        rule = PolicyRule.of(self.policy, num_exits, self.score)
        modes = self._eval()
        try:
            with torch.inference_mode():
                if self.decide == "torch":
                    torch_rule = TorchRule(rule, self.device) if rule is not None else None
                    bufs: dict[str, torch.Tensor] = {}
                    for start in range(0, n, self.batch_size):
                        b = min(self.batch_size, n - start)
                        self._run_batch_device(self._input(x[start : start + b]), b, torch_rule, bufs)
                        self._answer_batch(b, start, bufs, rule, out)
                else:
                    for start, stop in self._windows(n):
                        if stop - start <= self.batch_size:
                            self._run_batch_host(self._input(x[start:stop]), start, stop - start, rule, out)
                        else:
                            self._run_window_host(x, start, stop, rule, out)
                    if n:
                        np.argmax(out["logits"], axis=1, out=out["prediction"])
        finally:
            self._restore(modes)
        ex = out["exit"]
        logits = out.get("logits", np.zeros((n, 0), dtype=np.float32))
        return ExitResult(
            out["prediction"],
            ex,
            out["confidence"],
            out["expected_accuracy"],
            self.flops[ex],
            out["confidences"],
            logits,
        )

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

    def _logits_out(self, out: dict[str, np.ndarray], k: int) -> np.ndarray:
        if "logits" not in out:
            out["logits"] = np.zeros((len(out["exit"]), k), dtype=np.float32)
        return out["logits"]

    def _run_batch_host(
        self, xb: torch.Tensor, start: int, b: int, rule: PolicyRule | None, out: dict[str, np.ndarray]
    ) -> None:
        """One batch (rows ``start:start+b`` of the input), decisions in numpy."""
        alive = np.arange(start, start + b)  # global indices of samples still running
        rows: slice | np.ndarray = slice(start, start + b)  # the same rows, as a slice until the first compaction
        state: State = self.exec_model.initial_state(xb)
        for level in range(self.model.num_exits):
            state, keep = self._exit_host(level, state, alive, rows, rule, out)
            if keep is None:
                continue
            if keep.size == 0:
                return
            alive = rows = alive[keep]
            # compaction: later segments only see the survivors (padded up to min(b, min_rows))
            keep_t = torch.from_numpy(keep).to(self.device)
            state = index_state(state, _pad_rows(keep_t, min(b, self.min_rows)))

    def _run_window_host(
        self, x: np.ndarray | torch.Tensor, start: int, stop: int, rule: PolicyRule | None, out: dict[str, np.ndarray]
    ) -> None:
        """Rows ``start:stop`` of the input, several batches run level by level, decisions in numpy: after
        each exit the survivors of the batches that lost samples are regrouped into full batches, so
        every segment runs on as many rows as a batch of the full forward (see ``regroup``)."""
        bsz = self.batch_size
        pad_to = min(bsz, self.min_rows)
        # per chunk of rows that runs together: (state, global indices of its samples, the same as a slice or array)
        chunks: list[tuple[State, np.ndarray, slice | np.ndarray]] = [
            (
                self.exec_model.initial_state(self._input(x[s : min(s + bsz, stop)])),
                np.arange(s, min(s + bsz, stop)),
                slice(s, min(s + bsz, stop)),
            )
            for s in range(start, stop, bsz)
        ]
        for level in range(self.model.num_exits):
            going_on: list[tuple[State, np.ndarray, slice | np.ndarray]] = []
            thinned: list[tuple[State, torch.Tensor, np.ndarray]] = []  # (state, rows kept, their samples)
            for state, alive, rows in chunks:
                state, keep = self._exit_host(level, state, alive, rows, rule, out)
                if keep is None and alive.size == bsz:  # a full batch that nobody left: on as it is
                    going_on.append((state, alive, rows))
                elif keep is None or keep.size:
                    kept = np.arange(alive.size) if keep is None else keep
                    thinned.append((state, torch.from_numpy(kept).to(self.device), alive[kept]))
            if len(thinned) == 1:  # nothing to regroup with: compacted as in a lone batch
                state, keep_t, alive = thinned[0]
                going_on.append((index_state(state, _pad_rows(keep_t, pad_to)), alive, alive))
            elif thinned:
                merged = gather_states([(state, keep_t) for state, keep_t, _ in thinned])  # each row copied once
                alive_all = np.concatenate([alive for _, _, alive in thinned])
                for s in range(0, alive_all.size, bsz):
                    alive = alive_all[s : s + bsz]
                    state = index_state(merged, slice(s, s + alive.size))  # a view
                    if alive.size < pad_to:
                        state = index_state(state, _pad_rows(torch.arange(alive.size, device=self.device), pad_to))
                    going_on.append((state, alive, alive))
            if not going_on:
                return
            chunks = going_on

    def _exit_host(
        self,
        level: int,
        state: State,
        alive: np.ndarray,
        rows: slice | np.ndarray,
        rule: PolicyRule | None,
        out: dict[str, np.ndarray],
    ) -> tuple[State, np.ndarray | None]:
        """Segment ``level`` on ``state`` (the samples ``alive``, indexed as ``rows`` in ``out``; the state
        may carry padding rows after them), the exit decision, and the answers of those that leave.

        Returns the new state and ``keep``, the positions in ``alive`` of the samples that go on: None
        when all of them do, empty when none does (all left, or the last exit)."""
        state, zt = self._segments[level](state)
        n_alive = alive.size
        if zt.shape[0] != n_alive:  # padded survivor set: drop the copies' rows
            zt = zt[:n_alive]
        if zt.dtype != torch.float32:
            zt = zt.float()
        z = (zt if zt.device.type == "cpu" else zt.cpu()).numpy()  # (B_alive, K); a view on CPU
        s = confidence(z, self.score)  # the one confidence pass of this exit
        out["confidences"][rows, level] = s
        last = level == self.model.num_exits - 1
        if rule is None:
            leave = np.ones(n_alive, dtype=bool) if last else np.asarray(self.policy.exit_mask(level, z), bool)
            expected = None
        elif last:
            leave, expected = np.ones(n_alive, dtype=bool), rule.expected(level, z, s)
        else:
            leave, expected = rule.leave(level, z, s)
        n_leave = int(np.count_nonzero(leave))
        if n_leave:
            # every running sample's answer is written, not only the leavers': those that go on are
            # overwritten at their own exit, and no selection is made (the predictions are the
            # answering logits' argmax, taken once per run)
            out["exit"][rows] = level
            out["confidence"][rows] = s
            self._logits_out(out, z.shape[1])[rows] = z
            if expected is not None:
                out["expected_accuracy"][rows] = expected
            else:  # a policy asked: only for the leavers, as decide asks it
                sel = np.flatnonzero(leave)
                out["expected_accuracy"][alive[sel]] = self.policy.expected_accuracy(level, z[sel])
        if last or n_leave == n_alive:
            return state, _NONE_GO_ON
        if n_leave == 0:
            return state, None
        return state, np.flatnonzero(~leave)

    def _run_batch_device(
        self, xb: torch.Tensor, b: int, rule: TorchRule | None, bufs: dict[str, torch.Tensor]
    ) -> None:
        """One batch of ``b`` samples, decisions and bookkeeping on the device.

        Fills ``bufs["logits"][:b, l]`` for every exit computed for a sample and ``bufs["exit"][:b]``.
        """
        num_exits = self.model.num_exits
        if "exit" not in bufs:
            bufs["exit"] = torch.empty(self.batch_size, dtype=torch.int64, device=self.device)
        exits = bufs["exit"]
        exits[:b] = num_exits - 1
        alive: torch.Tensor | None = None  # rows of the batch still running; None: all b, in order
        n_alive = b
        state: State = self.exec_model.initial_state(xb)
        for level in range(num_exits):
            state, z = self._segments[level](state)
            z = z[:n_alive].float()
            if "logits" not in bufs:
                bufs["logits"] = torch.empty(
                    (self.batch_size, num_exits, z.shape[1]), dtype=torch.float32, device=self.device
                )
            if alive is None:
                bufs["logits"][:b, level] = z
            else:
                bufs["logits"][alive, level] = z
            if level == num_exits - 1:
                return
            if rule is None:
                leave = torch.as_tensor(self._numpy_mask(level, z), device=self.device)
                n_leave = int(leave.sum())
            else:
                leave, unsure = rule.leave(level, z)
                n_leave, n_unsure = torch.stack([leave.sum(), unsure.sum()]).tolist()  # one sync
                if n_unsure:
                    rows = unsure.nonzero().squeeze(1)
                    leave[rows] = torch.as_tensor(self._numpy_mask(level, z[rows]), device=self.device)
                    n_leave = int(leave.sum())
            if n_leave == 0:
                continue
            rows = torch.arange(b, device=self.device) if alive is None else alive
            exits[rows[leave]] = level
            if n_leave == n_alive:
                return
            keep = (~leave).nonzero().squeeze(1)
            alive, n_alive = rows[keep], n_alive - n_leave
            # compaction: later segments only see the survivors (padded up to min(b, min_rows))
            state = index_state(state, _pad_rows(keep, min(b, self.min_rows)))

    def _numpy_mask(self, level: int, z: torch.Tensor) -> np.ndarray:
        return np.asarray(self.policy.exit_mask(level, z.cpu().numpy()), dtype=bool)

    def _answer_batch(
        self, b: int, start: int, bufs: dict[str, torch.Tensor], rule: PolicyRule | None, out: dict[str, np.ndarray]
    ) -> None:
        """The answer columns of one device batch, from its logits buffer, with the numpy calls ``decide`` uses."""
        num_exits = self.model.num_exits
        ex = bufs["exit"][:b].cpu().numpy().copy()
        logits = bufs["logits"][:b].cpu().numpy()  # (b, L, K); entries after a sample's exit are stale
        computed = np.arange(num_exits)[None, :] <= ex[:, None]
        scores = np.full((b, num_exits), np.nan, dtype=np.float64)
        scores[computed] = confidence(logits[computed], self.score)
        rows = np.arange(b)
        z_exit = logits[rows, ex]  # (b, K), a copy
        s_exit = scores[rows, ex]
        expected = np.zeros(b, dtype=np.float64)
        for level in np.unique(ex):
            m = ex == level
            level = int(level)
            if rule is not None:
                expected[m] = rule.expected(level, z_exit[m], s_exit[m])
            else:
                expected[m] = self.policy.expected_accuracy(level, z_exit[m])
        sl = slice(start, start + b)
        out["exit"][sl] = ex
        out["confidences"][sl] = scores
        out["prediction"][sl] = z_exit.argmax(axis=1)
        out["confidence"][sl] = s_exit
        out["expected_accuracy"][sl] = expected
        self._logits_out(out, z_exit.shape[1])[sl] = z_exit

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

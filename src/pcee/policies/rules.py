"""Exit rules: what a policy decides at one exit, in numpy and on a torch device.

A policy gives its rule (:meth:`pcee.policies.base.ExitPolicy.exit_rule`), read from its fitted
state; the early-exit runner applies it after each segment and does not know which policy it is.
A rule has

- ``score``: the confidence score it reads (the runner computes it once per exit, and the answers'
  confidence columns are that score);
- a numpy form, :meth:`ExitRule.decide` and :meth:`ExitRule.expected`, given the exit's logits and
  their score ``s = confidence(z, score)``: the very calls the policy's own ``exit_mask`` and
  ``expected_accuracy`` make (the library's policies compute those through their rule), so the two
  are equal by construction;
- a torch form, :meth:`ExitRule.on_device`: the decisions on the logits' device in float64, or None
  when the rule has none (then the runner brings the logits to the host at each exit and asks the
  numpy form). A torch score can differ from numpy's in the last bits (about 1e-15), so the torch
  form also says where it is *unsure*: the score lies within :data:`SCORE_GUARD` of a threshold or a
  bin edge, or is not finite. The runner lets those samples run on and decides them with the numpy
  form once the batch is done, from their kept logits: the decisions always equal numpy's (the rules
  are row-wise and monotone in the score between edges, so a numpy score within the guard of the
  torch one decides the same).

Three rules cover the library: :class:`ScoreThreshold` (threshold, temperature, msdnet-budget,
EERO: the score, optionally temperature-scaled, against a per-exit threshold), :class:`MapThreshold`
(PCEE, PCEE-WS, risk-controlled: a reliability-map value against the served threshold) and
:class:`AskPolicy` (any other policy: its own ``exit_mask`` and ``expected_accuracy``, numpy only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pcee.calibration.scores import check_score, confidence, torch_confidence

if TYPE_CHECKING:  # torch is imported only where a rule runs on a device: the policies load without it
    import torch

    from pcee.calibration.reliability_map import ReliabilityMap
    from pcee.policies.base import ExitPolicy

#: a torch float64 score is within this of numpy's for the same float32 logits (observed: <= 1e-15 for
#: K up to 1000); decisions that could change within it are left to numpy
SCORE_GUARD = 1e-9


class DeviceRule(Protocol):
    """A rule's torch form."""

    def leave(self, level: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(leave, unsure), bool (B,) each, for the logits (B, K) of non-final exit ``level``."""
        ...


class ExitRule(Protocol):
    """What a policy decides at each exit (see the module docstring)."""

    score: str

    def decide(self, level: int, z: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(``exit_mask(level, z)``, ``expected_accuracy(level, z)`` or None when computed only for leavers)."""
        ...

    def expected(self, level: int, z: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``expected_accuracy(level, z)`` (B,) of samples answered at ``level``."""
        ...

    def on_device(self, device: torch.device | str, guard: float | None = None) -> DeviceRule | None:
        """The torch form on ``device`` (unsure within ``guard``, default :data:`SCORE_GUARD`), or None
        (the runner then asks the numpy form on the host)."""
        ...


@dataclass
class ScoreThreshold:
    """Samples leave at exit l where their score reaches ``thresholds[l]``; the expected accuracy is the
    score itself (of ``z / temperatures[l]`` when temperatures are given)."""

    score: str
    thresholds: Sequence[float] | np.ndarray
    temperatures: Sequence[float] | np.ndarray | None = None

    def __post_init__(self) -> None:
        check_score(self.score)
        self.thresholds = [float(t) for t in self.thresholds]
        if self.temperatures is not None:
            self.temperatures = [float(t) for t in self.temperatures]

    def expected(self, level: int, z: np.ndarray, s: np.ndarray) -> np.ndarray:
        if self.temperatures is not None:
            return confidence(np.asarray(z, dtype=np.float64) / self.temperatures[level], self.score)
        return s

    def decide(self, level: int, z: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e = self.expected(level, z, s)
        return e >= self.thresholds[level], e

    def on_device(self, device: torch.device | str, guard: float | None = None) -> DeviceRule:
        return _TorchScoreThreshold(self, SCORE_GUARD if guard is None else float(guard))


@dataclass
class MapThreshold:
    """Samples leave at exit l where the reliability map ``maps[l]`` of their score reaches ``served``;
    the expected accuracy is the map value."""

    score: str
    maps: Sequence[ReliabilityMap]
    served: float

    def __post_init__(self) -> None:
        check_score(self.score)

    def expected(self, level: int, z: np.ndarray, s: np.ndarray) -> np.ndarray:
        return self.maps[level].predict(s)

    def decide(self, level: int, z: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e = self.expected(level, z, s)
        return e >= self.served, e

    def on_device(self, device: torch.device | str, guard: float | None = None) -> DeviceRule:
        return _TorchMapThreshold(self, device, SCORE_GUARD if guard is None else float(guard))


@dataclass
class AskPolicy:
    """Any policy's own ``exit_mask`` and ``expected_accuracy``: numpy only, no torch form."""

    policy: ExitPolicy
    score: str = field(init=False)

    def __post_init__(self) -> None:
        self.score = check_score(self.policy.score)

    def expected(self, level: int, z: np.ndarray, s: np.ndarray) -> np.ndarray:
        return np.asarray(self.policy.expected_accuracy(level, z), dtype=np.float64)

    def decide(self, level: int, z: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, None]:
        return np.asarray(self.policy.exit_mask(level, z), dtype=bool), None  # expected: for the leavers only

    def on_device(self, device: Any, guard: float | None = None) -> None:
        return None


class _TorchScoreThreshold:
    def __init__(self, rule: ScoreThreshold, guard: float) -> None:
        self.rule, self.guard = rule, guard

    def leave(self, level: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zz = z.double()
        if self.rule.temperatures is not None:
            zz = zz / self.rule.temperatures[level]
        s = torch_confidence(zz, self.rule.score)
        thr = self.rule.thresholds[level]
        return s >= thr, ((s - thr).abs() <= self.guard) | ~s.isfinite()


class _TorchMapThreshold:
    """Per exit: the interior bin edges and "the map value reaches the served threshold" per bin, as tensors
    (every exit's in one host-to-device copy: a copy from pageable memory waits for the device)."""

    def __init__(self, rule: MapThreshold, device: torch.device | str, guard: float) -> None:
        import torch  # only where a rule runs on a device (the policies load without torch)

        self.score, self.guard, self.searchsorted = rule.score, guard, torch.searchsorted
        parts = []
        for m in rule.maps:
            parts.append(np.asarray(m.edges_, dtype=np.float64)[1:-1])
            parts.append((np.asarray(m.acc_) >= rule.served).astype(np.float64))  # numpy's comparison
        packed = torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0), device=device)
        self.levels = []
        offset = 0
        for m, (edges, acc) in zip(rule.maps, zip(parts[::2], parts[1::2], strict=True), strict=True):
            interior = packed[offset : offset + edges.size]
            passes = packed[offset + edges.size : offset + edges.size + acc.size] > 0.5
            self.levels.append((str(m.binning), int(m.n_bins), interior, passes))
            offset += edges.size + acc.size

    def leave(self, level: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        binning, n_bins, interior, passes = self.levels[level]
        s = torch_confidence(z, self.score)

        def bin_of(v: torch.Tensor) -> torch.Tensor:  # as ReliabilityMap.bin_index: NaN counts as 0
            v = v.nan_to_num(nan=0.0)
            idx = (v * n_bins).floor() if binning == "equal_width" else self.searchsorted(interior, v, right=True)
            return idx.clamp(0, n_bins - 1).long()

        lo, hi = bin_of(s - self.guard), bin_of(s + self.guard)  # bins are monotone in s
        return passes[lo], (lo != hi) | ~s.isfinite()

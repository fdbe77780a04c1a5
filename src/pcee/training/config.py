"""Training configuration: one validated dataclass, so a bad name fails before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

REGIMES = ("joint", "disjoint", "mixed", "sweet", "distill")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AUGMENTATIONS = ("auto", "none", "crop-flip")
DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("fp32", "bf16")
PLACEMENTS = ("auto", "device", "host")


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid {kind}s: {', '.join(valid)}")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    Parameters
    ----------
    regime : one of ``REGIMES`` (docs/architecture.md; see :mod:`pcee.training.regimes`).
    epochs : total epochs over all phases of the regime.
    batch_size : per-process mini-batch size (under torchrun each rank takes this many).
    optimizer : ``sgd`` (Nesterov momentum) or ``adamw``.
    lr, weight_decay, momentum : optimizer settings (momentum is used by SGD only).
    schedule : ``cosine`` (to 0 over each phase), ``step`` (x ``step_gamma`` at the
        ``step_milestones`` fractions of each phase) or ``constant``.
    phase1_fraction : share of the epochs spent in phase 1 by the two-phase regimes
        (``disjoint``, ``mixed``, ``distill``); 0 skips phase 1, 1 skips phase 2.
    distill_temperature : softmax temperature of the ``distill`` regime's KL loss.
    augment : ``auto`` (random crop with 4-pixel padding + horizontal flip for 3-channel inputs of
        at least 32x32, nothing otherwise), ``none`` or ``crop-flip``.
    seed : seeds python, numpy and torch; the data order and the augmentation follow from it.
    device : ``cpu``, ``cuda`` or ``auto`` (cuda if available).
    deterministic : torch's deterministic algorithms during training, and on CUDA cuDNN's deterministic
        algorithms without benchmarking (False: cuDNN benchmarks and picks the fastest, which may differ
        between runs). An explicit, recorded choice: on a GPU it costs time (issue 27 measured 0.77 against
        0.59 s per epoch for a ResNet-18); on CPU it changes neither the weights nor the time measurably.
    threads : torch's intra-op CPU threads while training (None: the process's count when training
        starts). The thread count decides the weights on CPU, so it is pinned for the run and recorded
        (:mod:`pcee.training.reproducibility`).
    precision : ``fp32``, or ``bf16`` (the forward and the loss under ``torch.autocast`` to bfloat16; the
        weights and the optimizer stay float32).
    channels_last : train with the model and the batches in channels-last memory format (4-D image
        inputs only); the model is back in the default format afterwards.
    data_placement : ``auto`` (the training split moves to the device once when it fits, at most a quarter
        of the free device memory; on CPU it is there already), ``device`` (always) or ``host`` (each batch
        copied from pinned host memory, non-blocking). The weights are the same either way.
    """

    regime: str = "mixed"
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    step_milestones: tuple[float, ...] = (0.5, 0.75)
    step_gamma: float = 0.1
    phase1_fraction: float = 0.5
    distill_temperature: float = 1.0
    augment: str = "auto"
    seed: int = 0
    device: str = "cpu"
    deterministic: bool = True
    eval_batch_size: int = 512
    threads: int | None = None
    precision: str = "fp32"
    channels_last: bool = False
    data_placement: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("regime", self.regime, REGIMES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("augmentation", self.augment, AUGMENTATIONS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("data placement", self.data_placement, PLACEMENTS)
        for name in ("deterministic", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"threads must be a positive integer or None (the process's count), got {self.threads!r}")
        if int(self.epochs) != self.epochs or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if int(self.eval_batch_size) != self.eval_batch_size or self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be a positive integer, got {self.eval_batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.phase1_fraction <= 1:
            raise ValueError(f"phase1_fraction must be in [0, 1], got {self.phase1_fraction!r}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature!r}")
        self.step_milestones = tuple(float(m) for m in self.step_milestones)
        if any(not 0 < m < 1 for m in self.step_milestones) or list(self.step_milestones) != sorted(
            self.step_milestones
        ):
            raise ValueError(f"step_milestones must be increasing fractions in (0, 1), got {self.step_milestones!r}")
        if not 0 < self.step_gamma <= 1:
            raise ValueError(f"step_gamma must be in (0, 1], got {self.step_gamma!r}")
        self.epochs = int(self.epochs)
        self.batch_size = int(self.batch_size)
        self.eval_batch_size = int(self.eval_batch_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``TrainConfig(**d)`` rebuilds it)."""
        d = asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid options: {', '.join(sorted(known))}")
        return cls(**d)

"""Early-exit inference that really skips the work of samples that already left.

The model runs segment by segment (``forward_segment``). After each non-final segment the policy
decides, from that exit's logits alone, which samples leave; only the survivors' hidden state is
kept (``index_state``), so later segments run on a smaller batch. The answers equal "compute
every exit, then ``policy.decide``" because the policy's per-exit rule sees the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from pcee.calibration.scores import confidence
from pcee.models.base import MultiExitModel, index_state
from pcee.policies.base import ExitPolicy
from pcee.selective import decisions


@dataclass
class ExitResult:
    """Per-sample answers of an early-exit run (numpy arrays, N samples, L exits).

    prediction : (N,) int64 predicted class
    exit : (N,) int64 exit that answered, 0-based
    confidence : (N,) float64 the policy's confidence score at that exit
    expected_accuracy : (N,) float64 ``policy.expected_accuracy`` at that exit (the map value for PCEE)
    flops : (N,) float64 cumulative F_exit spent on the sample
    confidences : (N, L) float64 score of every exit computed for the sample, NaN after its exit
    """

    prediction: np.ndarray
    exit: np.ndarray
    confidence: np.ndarray
    expected_accuracy: np.ndarray
    flops: np.ndarray
    confidences: np.ndarray

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


class EarlyExitRunner:
    """Batched early-exit inference of a multi-exit model under an exit policy.

    Parameters
    ----------
    model : MultiExitModel
    policy : fitted ExitPolicy whose ``exit_mask`` works without labels (every policy but the oracle)
    flops : (L,) cumulative F_l reported per sample
    batch_size : samples per forward pass
    device : torch device for the model and inputs
    """

    def __init__(self, model: MultiExitModel, policy: ExitPolicy, flops: np.ndarray, batch_size: int = 256, device: str | torch.device = "cpu") -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        flops = np.asarray(flops, dtype=np.float64)
        if flops.shape != (model.num_exits,):
            raise ValueError(f"flops must be ({model.num_exits},) for a model with {model.num_exits} exits, got shape {flops.shape}")
        if getattr(policy, "name", "") == "oracle":
            raise ValueError("the oracle needs labels and cannot run early exit; choose a deployable policy")
        self.model = model
        self.policy = policy
        self.flops = flops
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.score = policy_score(policy)
        self.model.to(self.device)

    def run(self, x: np.ndarray | torch.Tensor) -> ExitResult:
        """Answer every sample of ``x`` (N, C, H, W) with early exit."""
        n = int(x.shape[0])
        num_exits = self.model.num_exits
        prediction = np.zeros(n, dtype=np.int64)
        exits = np.zeros(n, dtype=np.int64)
        conf = np.zeros(n, dtype=np.float64)
        expected = np.zeros(n, dtype=np.float64)
        confidences = np.full((n, num_exits), np.nan, dtype=np.float64)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, n, self.batch_size):
                    xb = torch.as_tensor(x[start : start + self.batch_size], dtype=torch.float32).to(self.device)
                    self._run_batch(xb, start, prediction, exits, conf, expected, confidences)
        finally:
            self.model.train(was_training)
        return ExitResult(prediction, exits, conf, expected, self.flops[exits], confidences)

    def run_all_exits(self, x: np.ndarray | torch.Tensor) -> AllExits:
        """Run every sample of ``x`` (N, C, H, W) to the final exit, no early exit (shadow runs)."""
        from pcee.training.evaluate import predict_all_exits

        x = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.shape[0] == 0:
            num_exits = self.model.num_exits
            return AllExits(np.zeros((0, num_exits, 0), np.float32), np.zeros((0, num_exits)), np.zeros(0, np.int64))
        with torch.inference_mode():
            logits = predict_all_exits(self.model, x, batch_size=self.batch_size, device=self.device)
        conf = np.stack([confidence(logits[:, level], self.score) for level in range(logits.shape[1])], axis=1).astype(np.float64)
        return AllExits(logits, conf, logits[:, -1].argmax(axis=1).astype(np.int64))

    def _run_batch(self, xb, offset, prediction, exits, conf, expected, confidences) -> None:
        num_exits = self.model.num_exits
        alive = np.arange(offset, offset + xb.shape[0])  # global indices of samples still running
        state = self.model.initial_state(xb)
        for level in range(num_exits):
            state, z = self.model.forward_segment(level, state)  # z: (B_alive, K)
            z = z.float().cpu().numpy()
            s = confidence(z, self.score)
            confidences[alive, level] = s
            if level < num_exits - 1:
                leave = np.asarray(self.policy.exit_mask(level, z), dtype=bool)
            else:
                leave = np.ones(alive.size, dtype=bool)
            if leave.any():
                idx = alive[leave]
                prediction[idx] = z[leave].argmax(axis=1)
                exits[idx] = level
                conf[idx] = s[leave]
                expected[idx] = self.policy.expected_accuracy(level, z[leave])
            if leave.all() or level == num_exits - 1:
                return
            if leave.any():
                # compaction: later segments only see the survivors
                state = index_state(state, torch.as_tensor(~leave, device=self.device))
                alive = alive[~leave]

"""Helpers of the runner's exactness tests: a model that serves given logits, hard random logits, and
what the runner must answer (``policy.decide`` on every exit, then the numpy answer columns)."""

from __future__ import annotations

import numpy as np

from pcee.calibration.scores import confidence
from pcee.models.base import MultiExitModel


class LogitsModel(MultiExitModel):
    """Serves given logits: the input is an (N, L, K) array, exit k answers x[:, k] (no weights)."""

    def __init__(self, num_exits: int) -> None:
        super().__init__()
        self._num_exits = num_exits
        self.model_name, self.config = "logits", {}

    @property
    def num_exits(self) -> int:
        return self._num_exits

    def forward_segment(self, k, state):
        return state, state[:, k]


def target_logits(s: np.ndarray, k: int) -> np.ndarray:
    """Rows of K logits whose max_prob is s (up to rounding): one logit log(s (K-1) / (1-s)), the rest 0."""
    z = np.zeros((len(s), k))
    z[:, 0] = np.log(s * (k - 1) / (1 - s))
    return z


def tie_logits(rng: np.random.Generator, n: int, num_exits: int, k: int, n_bins: int = 15) -> np.ndarray:
    """Random logits (N, L, K) float32 with many hard cases mixed in."""
    z = rng.standard_normal((n, num_exits, k)) * rng.choice([0.5, 2.0, 6.0], size=(n, 1, 1))
    kind = rng.integers(0, 8, size=n)
    top = z.max(axis=2, keepdims=True)
    dup = kind == 1  # two equal maxima
    z[dup, :, 0] = top[dup, :, 0] + 1.0
    z[dup, :, 1] = top[dup, :, 0] + 1.0
    z[kind == 2] = 0.0  # uniform: max_prob 1/K, entropy score 0, margin 0
    sat = kind == 3  # saturated: max_prob exactly 1.0
    z[sat, :, 0] = 300.0
    edge = kind == 4  # max_prob on (or next to) an equal-width bin edge
    if edge.any() and k >= 2:
        for level in range(num_exits):
            b = rng.integers(1, n_bins, size=int(edge.sum()))
            s = np.clip(b / n_bins, 1.0 / k + 1e-6, 1 - 1e-6)
            z[edge, level] = target_logits(s, k)[:, rng.permutation(k)]
    z = z.astype(np.float32)
    copy = kind == 5  # an exact copy of another row (a fitted threshold is some row's score)
    z[copy] = z[rng.integers(0, n, size=int(copy.sum()))]
    return z


def reference_columns(policy, logits: np.ndarray, score: str) -> dict[str, np.ndarray]:
    """What the runner must answer: ``policy.decide`` on all exits, then the numpy answer columns."""
    exits = policy.decide(logits)
    rows = np.arange(len(logits))
    conf_all = confidence(logits, score)
    computed = np.arange(logits.shape[1])[None, :] <= exits[:, None]
    expected = np.zeros(len(logits))
    for level in np.unique(exits):
        m = exits == level
        expected[m] = policy.expected_accuracy(int(level), logits[m, level])
    return {
        "exit": exits,
        "prediction": logits[rows, exits].argmax(axis=1),
        "confidence": conf_all[rows, exits],
        "confidences": np.where(computed, conf_all, np.nan),
        "expected_accuracy": expected,
        "logits": logits[rows, exits],
    }


def assert_answers(result, ref: dict[str, np.ndarray], flops: np.ndarray) -> None:
    for name, value in ref.items():
        np.testing.assert_array_equal(getattr(result, name), value, err_msg=name)  # bit for bit (NaN == NaN)
    np.testing.assert_array_equal(result.flops, flops[ref["exit"]])


def spy_rows(monkeypatch, model) -> list[tuple[int, int]]:
    """(segment, rows) of every segment call the model gets."""
    seen: list[tuple[int, int]] = []
    original = model.forward_segment

    def spy(k, state):
        seen.append((k, (state[0] if isinstance(state, (list, tuple)) else state).shape[0]))
        return original(k, state)

    monkeypatch.setattr(model, "forward_segment", spy)
    return seen

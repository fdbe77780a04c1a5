"""The monitor's reference: the champion's validation confidences as the service would log them.

The service logs, per request, the confidence of every exit it computed (the policy's score), so
exit l is logged only for requests that did not leave before l. The reference applies the served
policy to the validation logits and hides the same entries (NaN), so both sides of every drift
test have the same selection.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pcee.calibration.scores import confidence


def policy_score(policy: Any) -> str:
    """The confidence score the policy (and so the service's log) uses; max_prob when it has none."""
    return str(policy.get_params().get("score", "max_prob"))


def reference_from_logits(logits: np.ndarray, policy: Any, score: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(confidences (N, L) with NaN after each row's exit, exits (N,)) for validation logits (N, L, K)."""
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"reference logits must be (N, L, K), got shape {logits.shape}")
    conf = confidence(logits, score or policy_score(policy))  # (N, L)
    exits = np.asarray(policy.decide(logits), dtype=np.int64)
    conf = np.where(np.arange(conf.shape[1])[None, :] <= exits[:, None], conf, np.nan)
    return conf, exits

"""Prometheus text exposition (format 0.0.4) for ``GET /metrics``, written by hand: a few counters,
one gauge set and two histograms do not justify a client library.

Selective answering: ``pcee_decisions_total{decision}`` counts final decisions (a deferred sample
is counted once its forward ended, as ``deferred`` or ``deferral_failed``); the window gauges cover
the last :data:`WINDOW` samples decided (answered or declined); ``pcee_feedback_answered_*`` count
feedback on answered rows (measured selective accuracy = correct / total)."""

from __future__ import annotations

import math
import threading
from collections import defaultdict, deque

from pcee.selective import DECISIONS

#: samples in the sliding coverage window
WINDOW = 1000

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def render(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_fmt(edge)}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        lab = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{lab} {self.sum:.6f}")
        out.append(f"{name}_count{lab} {self.total}")
        return out


def _fmt(v: float) -> str:
    return f"{v:g}"


def _gauge(v: float | None) -> str:
    return "NaN" if v is None else f"{v:.6g}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ServiceMetrics:
    """Thread-safe counters the handlers and the batch worker update."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http_requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status)
        self.errors: dict[str, int] = defaultdict(int)  # problem kind
        self.predictions = 0
        self.exits: dict[int, int] = defaultdict(int)
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.commit = Histogram((0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1))
        self.reloads = 0
        self.reload_failures = 0
        self.decisions: dict[str, int] = {d: 0 for d in DECISIONS}
        self.shadow_runs = 0
        self.shadow_agreement = 0
        self.window: deque[tuple[bool, float]] = deque(maxlen=WINDOW)  # (answered, expected accuracy)
        self.feedback_answered = 0
        self.feedback_answered_correct = 0

    def decided(self, decisions: list[str], answered: list[bool] | None = None, expected_accuracy: list[float] | None = None) -> None:
        """Count final ``decisions``; ``answered`` / ``expected_accuracy`` (one per sample decided in a
        batch) also enter the sliding window."""
        with self._lock:
            for d in decisions:
                self.decisions[d] = self.decisions.get(d, 0) + 1
            if answered is not None and expected_accuracy is not None:
                self.window.extend(zip(answered, expected_accuracy))

    def shadow(self, runs: int, agreeing: int) -> None:
        with self._lock:
            self.shadow_runs += runs
            self.shadow_agreement += agreeing

    def feedback_on_answered(self, correct: bool) -> None:
        with self._lock:
            self.feedback_answered += 1
            self.feedback_answered_correct += int(bool(correct))

    def window_stats(self) -> tuple[float | None, float | None]:
        """(coverage, mean expected accuracy of the answered) over the window; None when empty."""
        with self._lock:
            return self._window_stats()

    def _window_stats(self) -> tuple[float | None, float | None]:
        if not self.window:
            return None, None
        answered = [e for a, e in self.window if a]
        finite = [e for e in answered if math.isfinite(e)]
        return len(answered) / len(self.window), (sum(finite) / len(finite) if finite else None)

    def http(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.http_requests[(endpoint, status)] += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def batch(self, size: int, exits: list[int], latencies_s: list[float], commit_s: float | None = None) -> None:
        with self._lock:
            if commit_s is not None:
                self.commit.observe(commit_s)
            self.batch_size.observe(size)
            self.predictions += len(exits)
            for e in exits:
                self.exits[int(e)] += 1
            for t in latencies_s:
                self.latency.observe(t)

    def reload(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.reloads += 1
            else:
                self.reload_failures += 1

    def render(
        self, model_version: str, delta: float | None, uptime_s: float, registry_ok: bool, answer_threshold: float | None = None
    ) -> str:
        with self._lock:
            coverage, answered_expected = self._window_stats()
            lines = [
                "# HELP pcee_http_requests_total HTTP requests by endpoint and status code.",
                "# TYPE pcee_http_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.http_requests.items()):
                lines.append(f'pcee_http_requests_total{{endpoint="{_escape(endpoint)}",status="{status}"}} {n}')
            lines += ["# HELP pcee_errors_total Rejected or failed requests by problem.", "# TYPE pcee_errors_total counter"]
            for kind, n in sorted(self.errors.items()):
                lines.append(f'pcee_errors_total{{problem="{_escape(kind)}"}} {n}')
            lines += [
                "# HELP pcee_predictions_total Samples answered (one logged row each).",
                "# TYPE pcee_predictions_total counter",
                f"pcee_predictions_total {self.predictions}",
                "# HELP pcee_exit_total Samples answered per exit (0-based).",
                "# TYPE pcee_exit_total counter",
            ]
            for e, n in sorted(self.exits.items()):
                lines.append(f'pcee_exit_total{{exit="{e}"}} {n}')
            lines += [
                "# HELP pcee_prediction_latency_seconds Time from enqueue to durable log, per sample.",
                "# TYPE pcee_prediction_latency_seconds histogram",
                *self.latency.render("pcee_prediction_latency_seconds"),
                "# HELP pcee_batch_size Samples per micro-batch run.",
                "# TYPE pcee_batch_size histogram",
                *self.batch_size.render("pcee_batch_size"),
                "# HELP pcee_store_commit_seconds Time to write and commit one batch's rows.",
                "# TYPE pcee_store_commit_seconds histogram",
                *self.commit.render("pcee_store_commit_seconds"),
                "# HELP pcee_model_reloads_total Hot reloads by outcome.",
                "# TYPE pcee_model_reloads_total counter",
                f'pcee_model_reloads_total{{outcome="ok"}} {self.reloads}',
                f'pcee_model_reloads_total{{outcome="failed"}} {self.reload_failures}',
                "# HELP pcee_model_info The served model version and delta.",
                "# TYPE pcee_model_info gauge",
                f'pcee_model_info{{version="{_escape(model_version)}",delta="{"" if delta is None else _fmt(delta)}"}} 1',
                "# HELP pcee_registry_up Whether the last registry poll succeeded.",
                "# TYPE pcee_registry_up gauge",
                f"pcee_registry_up {int(registry_ok)}",
                "# HELP pcee_uptime_seconds Seconds since the service started.",
                "# TYPE pcee_uptime_seconds gauge",
                f"pcee_uptime_seconds {uptime_s:.3f}",
                "# HELP pcee_decisions_total Samples by how they ended: answered, abstained, deferred, deferral_failed.",
                "# TYPE pcee_decisions_total counter",
                *(f'pcee_decisions_total{{decision="{_escape(d)}"}} {n}' for d, n in self.decisions.items()),
                "# HELP pcee_shadow_runs_total Samples also run to the final exit (shadow runs).",
                "# TYPE pcee_shadow_runs_total counter",
                f"pcee_shadow_runs_total {self.shadow_runs}",
                "# HELP pcee_shadow_agreement_total Shadow runs whose served prediction equals the final exit's.",
                "# TYPE pcee_shadow_agreement_total counter",
                f"pcee_shadow_agreement_total {self.shadow_agreement}",
                "# HELP pcee_answer_threshold The answer threshold rho of the served model.",
                "# TYPE pcee_answer_threshold gauge",
                f"pcee_answer_threshold {_fmt(answer_threshold if answer_threshold is not None else 0.0)}",
                f"# HELP pcee_window_coverage Share answered of the last {WINDOW} samples decided (NaN when none).",
                "# TYPE pcee_window_coverage gauge",
                f"pcee_window_coverage {_gauge(coverage)}",
                f"# HELP pcee_window_answered_expected_accuracy Mean expected accuracy of the answered among the last {WINDOW} samples (estimated).",
                "# TYPE pcee_window_answered_expected_accuracy gauge",
                f"pcee_window_answered_expected_accuracy {_gauge(answered_expected)}",
                "# HELP pcee_feedback_answered_total Feedback labels received for answered requests.",
                "# TYPE pcee_feedback_answered_total counter",
                f"pcee_feedback_answered_total {self.feedback_answered}",
                "# HELP pcee_feedback_answered_correct_total Feedback labels equal to the answered prediction.",
                "# TYPE pcee_feedback_answered_correct_total counter",
                f"pcee_feedback_answered_correct_total {self.feedback_answered_correct}",
            ]
        return "\n".join(lines) + "\n"

"""The service's Prometheus metrics (``GET /metrics``), kept with ``prometheus_client``.

Each :class:`ServiceMetrics` owns its own :class:`~prometheus_client.CollectorRegistry`, so two
services in one process (as in the tests) do not share or collide on metrics.

Selective answering: ``pcee_decisions_total{decision}`` counts final decisions (a deferred sample
is counted once its forward ended, as ``deferred`` or ``deferral_failed``); the window gauges cover
the last :data:`WINDOW` samples decided (answered or declined); ``pcee_feedback_answered_*`` count
feedback on answered rows (measured selective accuracy = correct / total)."""

from __future__ import annotations

import math
import threading
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from pcee.selective import DECISIONS
from pcee.verification import LabelState

# The ``*_created`` series prometheus_client adds by default (one per counter and histogram) are
# read by nothing here and would double the series a scrape stores; the switch is process-wide.
disable_created_metrics()

#: samples in the sliding coverage window
WINDOW = 1000

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COMMIT_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class ServiceMetrics:
    """The metrics the handlers and the batch worker update (prometheus_client is thread-safe; the
    sliding window has its own lock). Counter names are given with ``_total``, as exposed."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # declared in the order they are exposed
        self._add_request_metrics()
        self._add_model_metrics()
        self._add_selective_metrics()
        self._add_label_metrics()
        self._add_refusal_metrics()
        self._lock = threading.Lock()
        self.window: deque[tuple[bool, float]] = deque(maxlen=WINDOW)  # (answered, expected accuracy)

    def _add_request_metrics(self) -> None:
        """Requests and samples answered: HTTP status, errors, exits, latency, micro-batches, store commits."""
        r = self.registry
        self.http_requests = Counter(
            "pcee_http_requests_total", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.errors = Counter("pcee_errors_total", "Rejected or failed requests by problem.", ["problem"], registry=r)
        self.predictions = Counter("pcee_predictions_total", "Samples answered (one logged row each).", registry=r)
        self.exits = Counter("pcee_exit_total", "Samples answered per exit (0-based).", ["exit"], registry=r)
        self.latency = Histogram(
            "pcee_prediction_latency_seconds",
            "Time from enqueue to durable log, per sample.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "pcee_batch_size", "Samples per micro-batch run.", buckets=BATCH_BUCKETS, registry=r
        )
        self.commit = Histogram(
            "pcee_store_commit_seconds",
            "Time to log one batch's rows durably (SQLite: the journal append; else the commit).",
            buckets=COMMIT_BUCKETS_S,
            registry=r,
        )

    def _add_model_metrics(self) -> None:
        """The served model and the service: reloads, version and delta, registry reachable, uptime."""
        r = self.registry
        self.reloads = Counter("pcee_model_reloads_total", "Hot reloads by outcome.", ["outcome"], registry=r)
        for outcome in ("ok", "failed"):  # exposed at 0 before any reload
            self.reloads.labels(outcome=outcome)
        self.model_info = Gauge(
            "pcee_model_info", "The served model version and delta.", ["version", "delta"], registry=r
        )
        self.registry_up = Gauge("pcee_registry_up", "Whether the last registry poll succeeded.", registry=r)
        self.uptime = Gauge("pcee_uptime_seconds", "Seconds since the service started.", registry=r)

    def _add_selective_metrics(self) -> None:
        """Selective answering: decisions, shadow runs, the answer threshold, the sliding window, feedback."""
        r = self.registry
        self.decisions = Counter(
            "pcee_decisions_total",
            "Samples by how they ended: answered, abstained, deferred, deferral_failed.",
            ["decision"],
            registry=r,
        )
        for d in DECISIONS:  # exposed at 0 before any decision
            self.decisions.labels(decision=d)
        self.shadow_runs = Counter(
            "pcee_shadow_runs_total", "Samples also run to the final exit (shadow runs).", registry=r
        )
        self.shadow_agreement = Counter(
            "pcee_shadow_agreement_total", "Shadow runs whose served prediction equals the final exit's.", registry=r
        )
        self.answer_threshold = Gauge(
            "pcee_answer_threshold", "The answer threshold rho of the served model.", registry=r
        )
        self.window_coverage = Gauge(
            "pcee_window_coverage", f"Share answered of the last {WINDOW} samples decided (NaN when none).", registry=r
        )
        self.window_answered_expected = Gauge(
            "pcee_window_answered_expected_accuracy",
            f"Mean expected accuracy of the answered among the last {WINDOW} samples (estimated).",
            registry=r,
        )
        self.feedback_answered = Counter(
            "pcee_feedback_answered_total", "Feedback labels received for answered requests.", registry=r
        )

    def _add_label_metrics(self) -> None:
        """What labels say: the verification status, the few-label count and budget, feedback equal to answers."""
        r = self.registry
        self.verification = Gauge(
            "pcee_verification",
            "1 for the served version's verification status (certified, label-free lower bound, unverified under "
            "drift, not certified).",
            ["status"],
            registry=r,
        )
        self.labels_received = Gauge(
            "pcee_labels_received",
            "Labels counted towards the few-label certification of a label-free version (NaN when not waiting).",
            registry=r,
        )
        self.label_budget = Gauge(
            "pcee_label_budget", "Labels the few-label certification waits for (NaN when not waiting).", registry=r
        )
        self.feedback_answered_correct = Counter(
            "pcee_feedback_answered_correct_total", "Feedback labels equal to the answered prediction.", registry=r
        )

    def _add_refusal_metrics(self) -> None:
        """Requests and labels refused (auth, rate limit, impossible label), and impossible labels stored."""
        r = self.registry
        self.auth_failures = Counter(
            "pcee_auth_failures_total",
            "Requests refused (401) for a missing or wrong bearer token, by endpoint.",
            ["endpoint"],
            registry=r,
        )
        for endpoint in ("/predict", "/feedback"):  # exposed at 0 before any refusal
            self.auth_failures.labels(endpoint=endpoint)
        self.rate_limited = Counter(
            "pcee_rate_limited_total", "Feedback requests refused (429) by the per-client rate limit.", registry=r
        )
        self.labels_refused = Counter(
            "pcee_feedback_labels_refused_total",
            "Feedback refused (422): the label is not a class of the model version that answered the request.",
            registry=r,
        )
        self.impossible_labels_stored = Gauge(
            "pcee_impossible_labels_stored",
            "Stored feedback labels outside the answering model's classes, skipped by every reader "
            "(counted at start-up and at each reload).",
            registry=r,
        )

    def decided(
        self, decisions: list[str], answered: list[bool] | None = None, expected_accuracy: list[float] | None = None
    ) -> None:
        """Count final ``decisions``; ``answered`` / ``expected_accuracy`` (one per sample decided in a
        batch) also enter the sliding window."""
        for d in decisions:
            self.decisions.labels(decision=d).inc()
        if answered is not None and expected_accuracy is not None:
            with self._lock:
                self.window.extend(zip(answered, expected_accuracy, strict=True))

    def shadow(self, runs: int, agreeing: int) -> None:
        self.shadow_runs.inc(runs)
        self.shadow_agreement.inc(agreeing)

    def feedback_on_answered(self, correct: bool) -> None:
        self.feedback_answered.inc()
        if correct:
            self.feedback_answered_correct.inc()

    def window_stats(self) -> tuple[float | None, float | None]:
        """(coverage, mean expected accuracy of the answered) over the window; None when empty."""
        with self._lock:
            window = list(self.window)
        if not window:
            return None, None
        answered = [e for a, e in window if a]
        finite = [e for e in answered if math.isfinite(e)]
        return len(answered) / len(window), (sum(finite) / len(finite) if finite else None)

    def http(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(endpoint=endpoint, status=str(status)).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(problem=kind).inc()

    def batch(self, size: int, exits: list[int], latencies_s: list[float], commit_s: float | None = None) -> None:
        if commit_s is not None:
            self.commit.observe(commit_s)
        self.batch_size.observe(size)
        self.predictions.inc(len(exits))
        for e in exits:
            self.exits.labels(exit=str(int(e))).inc()
        for t in latencies_s:
            self.latency.observe(t)

    def reload(self, ok: bool) -> None:
        self.reloads.labels(outcome="ok" if ok else "failed").inc()

    def render(
        self,
        model_version: str,
        delta: float | None,
        uptime_s: float,
        registry_ok: bool,
        answer_threshold: float | None = None,
        labels: LabelState | None = None,
    ) -> bytes:
        """The text exposition; the gauges that describe the current state are set here, on scrape."""
        coverage, answered_expected = self.window_stats()
        self.model_info.clear()  # only the served version is exposed
        self.model_info.labels(version=model_version, delta="" if delta is None else f"{delta:g}").set(1)
        self.registry_up.set(int(registry_ok))
        self.uptime.set(uptime_s)
        self.answer_threshold.set(answer_threshold if answer_threshold is not None else 0.0)
        self.window_coverage.set(math.nan if coverage is None else coverage)
        self.window_answered_expected.set(math.nan if answered_expected is None else answered_expected)
        if labels is not None:
            self.verification.clear()  # only the current status is exposed
            self.verification.labels(status=labels.status).set(1)
            self.labels_received.set(math.nan if labels.n_labels is None else labels.n_labels)
            self.label_budget.set(math.nan if labels.label_budget is None else labels.label_budget)
        return generate_latest(self.registry)

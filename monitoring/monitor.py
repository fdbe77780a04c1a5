"""Drift monitor: live per-exit confidences of a window vs the champion's validation confidences.

The test (Evidently 0.7, ``ValueDrift`` with an explicit method and threshold):

* **Method: two-sample Kolmogorov–Smirnov** (``method="ks"``, score = p-value). Confidences are
  one-dimensional and bounded, windows are small (hundreds of requests) and the reference is the
  validation split (hundreds to thousands of rows): KS is distribution-free, has an exact null
  distribution under "same distribution", and so a p-value threshold *is* the false-alarm rate
  per test. Distance scores (Wasserstein, PSI), Evidently's default above 1,000 rows, have no such
  calibration: their thresholds would have to be tuned per model.
* **Threshold: family-wise α = 0.01 per window, Bonferroni over the exits tested** (each column's
  threshold is α/m). Clean traffic is drawn from the same distribution as the validation split,
  so each window alarms with probability ≤ α, about 0.2 expected false alarms over 20 clean
  windows and P(≥ 2 alarms in 20) ≈ 1.7% (the goal is ≤ 1). Ties (max-prob saturating at 1.0)
  make KS conservative, which only lowers this.
* **Columns**: ``exit_0`` — the first exit's confidence — is computed for every request, so its
  distribution is an unbiased drift signal. A later exit ℓ is computed only for requests that did
  not leave earlier; its live values are compared with the reference rows that *also* reach ℓ
  under the served policy (same selection on both sides). An exit is tested only when the window
  has at least ``min_exit_count`` values for it.
* **Exit histogram**: reported (live vs reference frequencies, chi-square p-value through
  Evidently) but not part of the alarm: it is a function of the confidences already tested, and
  chi-square with thin exit bins is anti-conservative.

Selective answering (not part of the alarm): :meth:`DriftMonitor.check` also takes the window's
:class:`pcee.selective.SelectiveSummary` (coverage, abstentions, deferrals, accuracy on answered
requests: *measured* on the answered rows with feedback, *estimated* as their mean expected
accuracy); the report carries it (``to_dict()["selective"]``, the JSON and a table in the HTML).

Library layer only: arrays in, :class:`WindowReport` out; reports are written atomically.
Reading windows from the traffic store and MLflow logging live in ``tasks.monitor``, the Prefect
event in ``monitoring.events``, the order of the steps in the ``monitor`` flow (``flows/monitor.py``).
"""

from __future__ import annotations

import html as _html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

from pcee.atomic import write_text_atomic

DEFAULT_METHOD = "ks"
DEFAULT_ALPHA = 0.01
METHODS = ("ks",)  # p-value methods only: the alarm rule relies on a calibrated false-alarm rate


def _exit_column(level: int) -> str:
    return f"exit_{level}"


@dataclass
class ColumnDrift:
    """One confidence column's test in a window."""

    column: str
    method: str
    threshold: float
    p_value: float  # Evidently's drift score for ks
    statistic: float  # KS distance D (sup |F_ref - F_live|)
    drifted: bool
    n_live: int
    n_reference: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class WindowReport:
    """Result of one window: the alarm, per-column tests, exit histograms and the Evidently snapshot."""

    drifted: bool
    columns: list[ColumnDrift]
    window: dict[str, Any]
    n_live: int
    exit_hist_live: list[float]
    exit_hist_reference: list[float]
    exit_hist_p_value: float | None
    alpha: float
    method: str
    snapshot: Any = field(default=None, repr=False)  # evidently Snapshot (None when the window was too small)
    # the window's pcee.selective.SelectiveSummary as a dict (None when not given); not part of the alarm
    selective: dict[str, Any] | None = None

    @property
    def primary(self) -> ColumnDrift | None:
        """The column with the smallest p-value (the strongest evidence), or None if nothing was tested."""
        return min(self.columns, key=lambda c: c.p_value) if self.columns else None

    def to_dict(self) -> dict[str, Any]:
        primary = self.primary
        return {
            "drifted": self.drifted,
            "window": self.window,
            "n_live": self.n_live,
            "method": self.method,
            "alpha": self.alpha,
            "columns": [c.to_dict() for c in self.columns],
            "primary": primary.to_dict() if primary else None,
            "exit_histogram": {
                "live": self.exit_hist_live,
                "reference": self.exit_hist_reference,
                "chisquare_p_value": self.exit_hist_p_value,
            },
            "selective": None if self.selective is None else dict(self.selective),
        }

    def write(self, out_dir: str | os.PathLike, stem: str) -> tuple[Path, Path]:
        """Write ``<stem>.json`` (summary + Evidently's snapshot dict) and ``<stem>.html`` atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = self.to_dict()
        html = "<html><body><p>window too small for a drift test</p></body></html>"
        if self.snapshot is not None:
            payload["evidently"] = self.snapshot.dict()
            html = self.snapshot.get_html_str(as_iframe=False)
        if self.selective is not None:
            html = _insert_after_body(html, selective_html(self.selective))
        json_path = write_text_atomic(out_dir / f"{stem}.json", json.dumps(payload, indent=2, default=_json_default))
        html_path = write_text_atomic(out_dir / f"{stem}.html", html)
        return json_path, html_path


def selective_dict(selective: Any) -> dict[str, Any] | None:
    """A :class:`pcee.selective.SelectiveSummary` (or its dict) as a plain JSON-able dict; None stays None."""
    if selective is None:
        return None
    d = selective.to_dict() if hasattr(selective, "to_dict") else dict(selective)
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and math.isnan(value):
            value = None
        out[key] = value
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def selective_html(selective: dict[str, Any]) -> str:
    """A small HTML table of a window's coverage, abstentions, deferrals and accuracy on answered requests."""
    s = selective
    n_lab = s.get("n_labelled_answered") or 0
    rows = [
        ("requests", _fmt(s.get("n"))),
        ("answered", _fmt(s.get("answered"))),
        ("abstained", _fmt(s.get("abstained"))),
        ("deferred", _fmt(s.get("deferred"))),
        ("deferral_failed", _fmt(s.get("deferral_failed"))),
        ("coverage (answered / requests)", _fmt(s.get("coverage"))),
        (
            f"accuracy on answered, measured (on {n_lab} labelled answered requests)",
            _fmt(s.get("answered_accuracy_measured")),
        ),
        (
            "accuracy on answered, estimated (mean expected accuracy, no labels)",
            _fmt(s.get("answered_accuracy_estimated")),
        ),
        ("labels skipped (not a class of the answering model)", _fmt(s.get("n_impossible_labels", 0))),
    ]
    body = "".join(
        f"<tr><th style='text-align:left'>{_html.escape(k)}</th><td>{_html.escape(v)}</td></tr>" for k, v in rows
    )
    return (
        "<section id='pcee-selective' style='font-family:sans-serif;margin:1em'>"
        "<h3>Selective answering in this window (not part of the drift alarm)</h3>"
        f"<table border='1' cellpadding='4' style='border-collapse:collapse'>{body}</table></section>"
    )


def _insert_after_body(document: str, fragment: str) -> str:
    match = re.search(r"<body[^>]*>", document, flags=re.IGNORECASE)
    if match is None:
        return fragment + document
    return document[: match.end()] + fragment + document[match.end() :]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


class DriftMonitor:
    """Compare windows of live confidences with a fixed reference.

    Parameters
    ----------
    reference_confidences : (N, L) float, NaN where the served policy would not compute that exit
        (see :func:`monitoring.reference.reference_from_logits`).
    reference_exits : (N,) int, the exit the served policy takes for each reference row.
    method : drift test, one of ``METHODS``.
    alpha : family-wise false-alarm rate per window (Bonferroni over the tested exits).
    min_window : a window with fewer requests is reported as untested (no alarm).
    min_exit_count : an exit column is tested only with at least this many live and reference values.
    """

    def __init__(
        self,
        reference_confidences: np.ndarray,
        reference_exits: np.ndarray,
        method: str = DEFAULT_METHOD,
        alpha: float = DEFAULT_ALPHA,
        min_window: int = 50,
        min_exit_count: int = 30,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown drift method {method!r}; valid choices: {', '.join(METHODS)}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        ref = np.asarray(reference_confidences, dtype=np.float64)
        if ref.ndim != 2 or ref.shape[0] == 0:
            raise ValueError(f"reference_confidences must be a non-empty (N, L) array, got shape {ref.shape}")
        if np.isnan(ref[:, 0]).any():
            raise ValueError("reference_confidences[:, 0] (first exit) must be finite for every row")
        exits = np.asarray(reference_exits, dtype=np.int64)
        if exits.shape != (ref.shape[0],):
            raise ValueError(f"reference_exits must be ({ref.shape[0]},), got shape {exits.shape}")
        self.reference_confidences = ref
        self.reference_exits = exits
        self.method = method
        self.alpha = float(alpha)
        self.min_window = int(min_window)
        self.min_exit_count = int(min_exit_count)

    @property
    def num_exits(self) -> int:
        return self.reference_confidences.shape[1]

    def _histogram(self, exits: np.ndarray) -> list[float]:
        counts = np.bincount(exits, minlength=self.num_exits)[: self.num_exits].astype(np.float64)
        return (counts / max(counts.sum(), 1.0)).round(6).tolist()

    def check(
        self,
        confidences: np.ndarray,
        exits: np.ndarray,
        window: dict[str, Any] | None = None,
        selective: Any = None,
    ) -> WindowReport:
        """Test one window: ``confidences`` (n, L') with NaN where not computed (L' ≤ L), ``exits`` (n,).

        ``selective``: the window's :class:`pcee.selective.SelectiveSummary` (or its dict), carried
        by the report as it is; it does not change the drift test."""
        live, live_exits = self._live_window(confidences, exits)
        n = live.shape[0]
        base = dict(
            window=dict(window or {}),
            n_live=n,
            exit_hist_live=self._histogram(live_exits) if n else [0.0] * self.num_exits,
            exit_hist_reference=self._histogram(self.reference_exits),
            alpha=self.alpha,
            method=self.method,
            selective=selective_dict(selective),
        )
        if n < self.min_window:
            return WindowReport(drifted=False, columns=[], exit_hist_p_value=None, **base)
        tested = self._tested_exits(live)
        threshold = self.alpha / len(tested)
        snapshot, metrics, exit_metric = self._run_report(live, live_exits, tested, threshold)
        columns = [
            self._column_drift(live[:, level], self.reference_confidences[:, level], snapshot, metric, threshold)
            for level, metric in zip(tested, metrics, strict=True)
        ]
        return WindowReport(
            drifted=any(c.drifted for c in columns),
            columns=columns,
            exit_hist_p_value=_drift_result(snapshot, exit_metric)[0],
            snapshot=snapshot,
            **base,
        )

    def _live_window(self, confidences: np.ndarray, exits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The window's confidences as (n, L') float64 and its exits as (n,) int64, or a ValueError."""
        live = np.asarray(confidences, dtype=np.float64)
        if live.ndim == 1:
            live = live[:, None]
        if live.ndim != 2 or live.shape[1] > self.num_exits:
            raise ValueError(f"confidences must be (n, ≤{self.num_exits}), got shape {live.shape}")
        live_exits = np.asarray(exits, dtype=np.int64)
        if live_exits.shape != (live.shape[0],):
            raise ValueError(f"exits must be ({live.shape[0]},), got shape {live_exits.shape}")
        return live, live_exits

    def _tested_exits(self, live: np.ndarray) -> list[int]:
        """The exits with enough values on both sides to be tested (the first exit always)."""
        tested: list[int] = []
        for level in range(live.shape[1]):
            n_live = int(np.isfinite(live[:, level]).sum())
            n_ref = int(np.isfinite(self.reference_confidences[:, level]).sum())
            if level == 0 or (n_live >= self.min_exit_count and n_ref >= self.min_exit_count):
                tested.append(level)
        return tested

    def _run_report(
        self, live: np.ndarray, live_exits: np.ndarray, tested: list[int], threshold: float
    ) -> tuple[Any, list[Any], Any]:
        """Evidently's drift report on the tested exit columns and the exit histogram:
        (the run's snapshot, one ``ValueDrift`` per tested exit, the exit histogram's ``ValueDrift``)."""
        from evidently import DataDefinition, Dataset, Report  # heavy import (~5 s): only when testing
        from evidently.metrics import ValueDrift

        # Evidently compares columns of two frames; NaN (not computed) rows are dropped per column by
        # the KS test, so each column is compared on its own non-missing values.
        cols = [_exit_column(level) for level in tested]
        cur = pd.DataFrame({_exit_column(lv): live[:, lv] for lv in tested})
        ref = pd.DataFrame({_exit_column(lv): self.reference_confidences[:, lv] for lv in tested})
        cur["exit"] = live_exits.astype(str)
        ref["exit"] = self.reference_exits.astype(str)
        definition = DataDefinition(numerical_columns=cols, categorical_columns=["exit"])
        metrics = [ValueDrift(column=c, method=self.method, threshold=threshold) for c in cols]
        exit_metric = ValueDrift(column="exit", method="chisquare", threshold=self.alpha)
        snapshot = Report([*metrics, exit_metric], include_tests=True).run(
            current_data=Dataset.from_pandas(cur, data_definition=definition),
            reference_data=Dataset.from_pandas(ref, data_definition=definition),
        )
        return snapshot, metrics, exit_metric

    def _column_drift(
        self, live: np.ndarray, reference: np.ndarray, snapshot: Any, metric: Any, threshold: float
    ) -> ColumnDrift:
        """One exit column's drift test in the run, on its computed (finite) live and reference values."""
        a, b = reference[np.isfinite(reference)], live[np.isfinite(live)]
        p_value, drifted = _drift_result(snapshot, metric)
        return ColumnDrift(
            column=metric.column,
            method=self.method,
            threshold=threshold,
            p_value=p_value,
            # Evidently's "ks" keeps only ks_2samp's p-value (its ValueDrift result has no statistic): D from scipy
            statistic=float(ks_2samp(a, b).statistic),
            drifted=drifted,
            n_live=int(b.size),
            n_reference=int(a.size),
        )


def _drift_result(snapshot: Any, metric: Any) -> tuple[float, bool]:
    """A ``ValueDrift`` metric's typed result in the run: its drift score and whether its drift test failed."""
    from evidently.legacy.tests.base_test import TestStatus

    result = snapshot.context.get_metric_result(metric)
    if not result.tests:
        raise RuntimeError(
            f"Evidently returned no drift test for column {metric.column!r} (include_tests=True expected)"
        )
    return float(result.value), any(test.status == TestStatus.FAIL for test in result.tests)

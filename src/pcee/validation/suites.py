"""Great Expectations suites (GX Core 1.x, ephemeral context): the dataset suite run before
training and the smaller live-batch suite for served batches.

GX validates tables, so images go through the per-sample summary frame
(:mod:`pcee.validation.summary`); split sizes and class balance go through a small per-(split,
class) count table. A failed suite raises :class:`ValidationFailed` naming every failing
expectation.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pcee.validation.summary import summarize_array, summarize_splits

SPLIT_NAMES = ("train", "val", "test")
_lock = threading.Lock()
_context = None


class ValidationFailed(ValueError):
    """A suite failed; ``failures`` lists (suite, expectation, column, observed) for each failure."""

    def __init__(self, suite: str, failures: list[dict[str, Any]]):
        self.suite = suite
        self.failures = failures
        lines = [
            f"{f['suite']}: {f['expectation']}({f['column'] or 'table'}) failed: {f['observed']}" for f in failures
        ]
        super().__init__(f"data validation failed ({len(failures)} failing expectation(s)):\n  " + "\n  ".join(lines))


@dataclass
class ValidationReport:
    """Outcome of a suite that passed: per-expectation results (for logging and artifacts)."""

    suite: str
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(r["success"] for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "success": self.success,
            "n_expectations": len(self.results),
            "results": self.results,
        }


def _gx():
    """Import GX quietly (no analytics, no progress bars) and build one ephemeral context per process."""
    global _context
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    if _context is None:
        _context = gx.get_context(mode="ephemeral")
        try:  # progress bars off (they write to stderr for every validation)
            from great_expectations.data_context.types.base import ProgressBarsConfig

            _context.variables.progress_bars = ProgressBarsConfig(globally=False)
        except Exception:  # noqa: BLE001 - older/newer layouts; bars are cosmetic
            pass
    return gx, _context


def _run(suite_name: str, frame: pd.DataFrame, expectations: list) -> list[dict[str, Any]]:
    """Validate ``frame`` against ``expectations``; returns one dict per expectation."""
    with _lock:  # the ephemeral context is shared; GX is not thread-safe
        gx, ctx = _gx()
        ds_name = f"pcee-{suite_name}"
        try:
            source = ctx.data_sources.get(ds_name)
            batch_def = source.get_asset("frame").get_batch_definition("whole")
        except Exception:  # noqa: BLE001 - first use in this process
            source = ctx.data_sources.add_pandas(ds_name)
            batch_def = source.add_dataframe_asset("frame").add_batch_definition_whole_dataframe("whole")
        suite = gx.ExpectationSuite(name=suite_name, expectations=expectations)
        batch = batch_def.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format="SUMMARY")
    rows = []
    for r in result.results:
        cfg = r.expectation_config
        kwargs = dict(cfg.kwargs)
        res = r.result or {}
        observed = res.get("observed_value")
        if observed is None and "unexpected_count" in res:
            observed = f"{res['unexpected_count']} unexpected value(s), e.g. {_plain(list(res.get('partial_unexpected_list') or [])[:5])}"
        if r.exception_info and r.exception_info.get("raised_exception"):
            observed = f"error: {r.exception_info.get('exception_message')}"
        rows.append(
            {
                "suite": suite_name,
                "expectation": cfg.type,
                "column": kwargs.get("column"),
                "success": bool(r.success),
                "observed": _plain(observed),
            }
        )
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _raise_on_failure(suite: str, rows: list[dict[str, Any]]) -> ValidationReport:
    failures = [r for r in rows if not r["success"]]
    if failures:
        raise ValidationFailed(suite, failures)
    return ValidationReport(suite=suite, results=rows)


def class_count_frame(summary: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    """One row per (split, class): count, fraction of the split, split size (zeros included)."""
    rows = []
    for split in sorted(summary["split"].unique()):
        labels = summary.loc[summary["split"] == split, "label"].to_numpy()
        size = len(labels)
        values = np.union1d(np.arange(num_classes), labels)  # out-of-range labels get rows too
        for label in values:
            count = int((labels == label).sum())
            rows.append(
                {"split": split, "label": int(label), "count": count, "fraction": count / size, "split_size": size}
            )
    return pd.DataFrame(rows, columns=pd.Index(["split", "label", "count", "fraction", "split_size"]))


def dataset_expectations(
    num_classes: int, input_shape: tuple[int, int, int], min_split_size: int, balance: tuple[float, float]
) -> tuple[list, list]:
    """(per-sample expectations, per-class-count expectations) of the dataset suite."""
    gx, _ = _gx()
    E = gx.expectations
    c, h, w = input_shape
    samples = [
        E.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(num_classes))),
        E.ExpectColumnValuesToBeInSet(column="channels", value_set=[c]),
        E.ExpectColumnValuesToBeInSet(column="height", value_set=[h]),
        E.ExpectColumnValuesToBeInSet(column="width", value_set=[w]),
        E.ExpectColumnValuesToNotBeNull(column="mean"),  # an all-non-finite image has no statistics
        E.ExpectColumnValuesToBeBetween(column="min", min_value=0.0, max_value=1.0),
        E.ExpectColumnValuesToBeBetween(column="max", min_value=0.0, max_value=1.0),
        E.ExpectColumnValuesToBeBetween(column="n_nonfinite", min_value=0, max_value=0),
        E.ExpectColumnDistinctValuesToEqualSet(column="split", value_set=list(SPLIT_NAMES)),
    ]
    lo, hi = balance
    classes = [
        E.ExpectColumnValuesToBeBetween(column="split_size", min_value=min_split_size),
        E.ExpectColumnValuesToBeBetween(column="fraction", min_value=lo / num_classes, max_value=hi / num_classes),
        E.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=list(range(num_classes))),
    ]
    return samples, classes


def validate_dataset(splits, min_split_size: int = 50, balance: tuple[float, float] = (0.5, 2.0)) -> ValidationReport:
    """Run the dataset suite on a ``DatasetSplits``; raise :class:`ValidationFailed` if it fails.

    ``balance`` bounds each class's share of every split to [lo/K, hi/K] (K = number of classes).
    """
    summary = summarize_splits(splits)
    samples, classes = dataset_expectations(splits.num_classes, tuple(splits.input_shape), min_split_size, balance)
    rows = _run("dataset-samples", summary, samples)
    rows += _run("dataset-classes", class_count_frame(summary, splits.num_classes), classes)
    return _raise_on_failure(f"dataset:{splits.name}", rows)


def validate_batch(x: np.ndarray, input_shape: tuple[int, int, int]) -> ValidationReport:
    """The live-batch suite (shape, pixel range, finite) on images ``x`` (N, C, H, W)."""
    gx, _ = _gx()
    E = gx.expectations
    c, h, w = input_shape
    expectations = [
        E.ExpectColumnValuesToBeInSet(column="channels", value_set=[c]),
        E.ExpectColumnValuesToBeInSet(column="height", value_set=[h]),
        E.ExpectColumnValuesToBeInSet(column="width", value_set=[w]),
        E.ExpectColumnValuesToBeBetween(column="n_nonfinite", min_value=0, max_value=0),
        E.ExpectColumnValuesToNotBeNull(column="mean"),
        E.ExpectColumnValuesToBeBetween(column="min", min_value=0.0, max_value=1.0),
        E.ExpectColumnValuesToBeBetween(column="max", min_value=0.0, max_value=1.0),
    ]
    return _raise_on_failure("live-batch", _run("live-batch", summarize_array(x, None, "live"), expectations))

"""Great Expectations edge: dataset and live-batch suites over per-sample summary frames."""

from pcee.validation.suites import ValidationFailed, ValidationReport, validate_batch, validate_dataset
from pcee.validation.summary import SUMMARY_COLUMNS, summarize_array, summarize_splits

__all__ = [
    "SUMMARY_COLUMNS",
    "ValidationFailed",
    "ValidationReport",
    "summarize_array",
    "summarize_splits",
    "validate_batch",
    "validate_dataset",
]

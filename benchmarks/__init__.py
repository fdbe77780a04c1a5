"""pcee's benchmarks: each script prints a table (``uv run python benchmarks/NAME.py``, or
``python -m benchmarks.NAME``). A package, importable like ``flows`` and ``tasks`` (the project's
editable install puts the repository on the path), so the scripts share :mod:`benchmarks.harness`
(load loop, result cell, service processes, the digits bundle) and the evidence experiments share
:mod:`benchmarks.evidence.evidence_common`, with no ``sys.path`` edits."""

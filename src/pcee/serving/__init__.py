"""The HTTP service: FastAPI app, micro-batching, model loading from the registry, input checks.

``python -m pcee.serving`` (or ``pcee serve``) starts it; see :mod:`pcee.cli.serve` for options.
"""

"""The HTTP service: FastAPI app, micro-batching, model loading from the registry, input checks.

``pcee serve`` (or ``python -m pcee.cli serve``) starts it; see :mod:`pcee.cli.serve` for options.
"""

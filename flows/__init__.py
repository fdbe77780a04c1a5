"""Prefect flows: train, calibrate, monitor, recalibrate, and ``flows.serve`` (the deployments process).

Flows are thin: they order tasks (``tasks/``) and hold no library logic; see docs/architecture.md.
"""

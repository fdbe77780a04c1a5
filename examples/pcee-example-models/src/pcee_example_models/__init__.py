"""Example multi-exit networks for pcee (entry points ``tiny-mlp-exits`` and ``tiny-conv-exits``)."""

from pcee_example_models.nets import TinyConvConfig, TinyConvExits, TinyMLPExits

__all__ = ["TinyMLPExits", "TinyConvExits", "TinyConvConfig"]

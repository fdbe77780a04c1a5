"""Training multi-exit networks: regimes (joint, disjoint, mixed, sweet, distill), the loop, evaluation
into the outputs contract, checkpoints, and the torchrun plumbing."""

from pcee.training.checkpoint import load_checkpoint, save_checkpoint
from pcee.training.config import REGIMES, TrainConfig
from pcee.training.evaluate import compute_outputs, exit_accuracies, predict_all_exits
from pcee.training.trainer import seed_everything, train_model

__all__ = [
    "REGIMES",
    "TrainConfig",
    "compute_outputs",
    "exit_accuracies",
    "load_checkpoint",
    "predict_all_exits",
    "save_checkpoint",
    "seed_everything",
    "train_model",
]

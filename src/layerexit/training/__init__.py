"""Training: objectives (stages with per-exit loss weights) and the accelerate-based loop."""

from .objectives import OBJECTIVES, Objective, Stage, make_objective, weighted_exit_loss
from .trainer import TrainConfig, train

__all__ = ["OBJECTIVES", "Objective", "Stage", "TrainConfig", "make_objective", "train", "weighted_exit_loss"]

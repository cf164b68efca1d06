"""Training: objectives (stages with per-exit loss weights) and the accelerate-based loop."""

from .objectives import OBJECTIVES, Objective, Stage, make_objective, weighted_exit_loss
from .runfolder import training_config
from .trainer import TrainConfig, train

__all__ = ["OBJECTIVES", "Objective", "Stage", "TrainConfig", "make_objective", "train", "training_config",
           "weighted_exit_loss"]

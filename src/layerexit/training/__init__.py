"""Training: objectives (stages with per-exit loss weights) and the accelerate-based loop.

Attributes load on first use, so ``training.config`` (the hyper-parameters) imports without torch.
"""

from .._lazy import lazy_attributes
from .config import TrainConfig

_ATTRIBUTES = {"OBJECTIVES": ".objectives", "Objective": ".objectives", "Stage": ".objectives",
               "make_objective": ".objectives", "weighted_exit_loss": ".objectives", "train": ".trainer",
               "training_config": ".runfolder"}
__getattr__ = lazy_attributes(__name__, _ATTRIBUTES)
__all__ = ["OBJECTIVES", "Objective", "Stage", "TrainConfig", "make_objective", "train", "training_config",
           "weighted_exit_loss"]

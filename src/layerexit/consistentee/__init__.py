"""ConsistentEE (Zeng et al., AAAI 2024): per-layer exit policies trained by reinforcement learning, with the
memorized-layer hardness reward. Inference uses the ``consistentee`` exit rule (``layerexit.rules.policy``)."""

from .rollout import memorized_layer, path_log_prob, reward, rollout_loss
from .schedule import ConsistentEEConfig, train_consistentee

__all__ = ["ConsistentEEConfig", "memorized_layer", "path_log_prob", "reward", "rollout_loss", "train_consistentee"]

"""ConsistentEE (Zeng et al., AAAI 2024): per-layer exit policies trained by reinforcement learning, with the
memorized-layer hardness reward. Inference uses the ``consistentee`` exit rule (``layerexit.rules.policy``).

Attributes load on first use, so ``consistentee.config`` imports without torch.
"""

from .._lazy import lazy_attributes
from .config import ConsistentEEConfig

_ATTRIBUTES = {"memorized_layer": ".rollout", "path_log_prob": ".rollout", "reward": ".rollout",
               "rollout_loss": ".rollout", "train_consistentee": ".schedule"}
__getattr__ = lazy_attributes(__name__, _ATTRIBUTES)
__all__ = ["ConsistentEEConfig", "memorized_layer", "path_log_prob", "reward", "rollout_loss", "train_consistentee"]

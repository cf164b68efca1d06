"""ConsistentEE's hyper-parameters, importable without torch (the command line builds its options from
these fields)."""

from __future__ import annotations

from dataclasses import dataclass

from ..catalog import ACTIONS
from ..errors import bad_value
from ..training.config import option


@dataclass
class ConsistentEEConfig:
    """ConsistentEE's own hyper-parameters (defaults: the reference code's, scaled to a CPU budget)."""

    alpha: float = option(1.0, "layer cost in the reward -CE - alpha*(e/L)*(1-m/L); the reference code's "
                          "raw-layer alpha_ref equals alpha / L")
    hardness: bool = option(True, "scale the layer cost by the memorized-layer factor (1 - m/L)")
    copies: int = option(8, "K rollouts per instance (group-mean baseline)")
    action: str = option("bernoulli", "how a rollout samples its exits", ACTIONS)
    epsilon: float = option(0.1, "exploration rate for eps_greedy")
    rounds: int = option(1, "alternating stage-2/stage-3 rounds")
    policy_hidden: int = option(32, "hidden width of each layer's policy network")
    stage2_epochs: int = option(2, "policy-only epochs per round")
    stage2_batch_size: int = option(32, "batch size of stage 2")
    stage2_learning_rate: float = option(3e-4, "learning rate of stage 2")
    stage3_epochs: int = option(1, "epochs of stage 3 per round (0 skips it: policies only)")
    stage3_batch_size: int = option(32, "batch size of stage 3")
    stage3_learning_rate: float = option(3e-5, "learning rate of stage 3")

    def validate(self) -> None:
        if self.action not in ACTIONS:
            raise bad_value("action", self.action, f"choose one of {', '.join(ACTIONS)}")
        if not self.alpha >= 0:
            raise bad_value("alpha", self.alpha, "use alpha >= 0 (0 turns the layer cost off)")
        if int(self.copies) < 2:
            raise bad_value("copies", self.copies, "use K >= 2: the baseline is the mean reward of the K copies, "
                            "so one copy has zero advantage and learns nothing")
        if not 0 <= self.epsilon <= 1:
            raise bad_value("epsilon", self.epsilon, "use a probability in [0, 1]")
        for name in ("rounds", "stage2_epochs", "stage3_epochs", "stage2_batch_size", "stage3_batch_size",
                     "policy_hidden"):
            if int(getattr(self, name)) < (0 if name == "stage3_epochs" else 1):
                raise bad_value(name, getattr(self, name), "use a whole number >= 1")
        for name in ("stage2_learning_rate", "stage3_learning_rate"):
            if not getattr(self, name) > 0:
                raise bad_value(name, getattr(self, name), "use a positive learning rate")

"""ConsistentEE's hyper-parameters, importable without torch (the command line builds its options from
these fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..catalog import ACTIONS
from ..errors import bad_value
from ..training.config import option

#: the policies' optional inputs beside the exit feature (described in layerexit.heads.POLICY_INPUTS)
POLICY_INPUT_NAMES = ("maxprob", "margin", "entropy", "layer")
#: the default policy inputs (the paper's form is none: ``policy_inputs=""``)
DEFAULT_POLICY_INPUTS = POLICY_INPUT_NAMES
#: "paper": -CE minus the (hardness-weighted) layer cost; "ce": -CE alone, as the released reference code trains;
#: "accuracy" / "agreement": 1 if the chosen exit is right / agrees with the last exit, minus the same layer cost;
#: "probability": the chosen exit's probability of the right label (exp(-CE), in [0, 1]), minus the same layer cost;
#: "blend": the mean of the two gains, (1[right] + probability) / 2, minus the same layer cost
REWARDS = ("paper", "ce", "accuracy", "agreement", "probability", "blend")
#: "reinforce": sampled rollouts with the K copies' mean as baseline (the paper); "expected": the exact gradient of
#: the expected reward over the exit distribution (every exit's logits are computed anyway)
ESTIMATORS = ("reinforce", "expected")
#: stage 1's objectives (``training.OBJECTIVES`` that need no per-exit weights from the user)
STAGE1_OBJECTIVES = ("weighted", "distilled")


@dataclass
class ConsistentEEConfig:
    """ConsistentEE's own hyper-parameters.

    Defaults: what measured best on SST-2 with frozen MiniLM-L6 and MPNet-12 stage 1s (docs/benchmarks.md), not
    the paper's: the ``blend`` reward (the mean of the 0/1 correctness and the right label's probability), the
    ``expected`` estimator, the confidence policy inputs and a stage 2 of 10 epochs at lr 3e-3. The paper's form is ``reward="paper", estimator="reinforce", policy_inputs=""`` (with
    ``stage2_epochs=2, stage2_learning_rate=3e-4`` our earlier defaults); the released reference code's reward is
    ``reward="ce"``.
    """

    alpha: float = option(1.0, "layer cost in the reward -CE - alpha*(e/L)*(1-m/L); the reference code's "
                          "raw-layer alpha_ref equals alpha / L")
    hardness: bool = option(True, "scale the layer cost by the memorized-layer factor (1 - m/L)")
    copies: int = option(8, "K rollouts per instance (group-mean baseline)")
    action: str = option("bernoulli", "how a rollout samples its exits", ACTIONS)
    epsilon: float = option(0.1, "exploration rate for eps_greedy")
    rounds: int = option(1, "alternating stage-2/stage-3 rounds")
    policy_hidden: int = option(32, "hidden width of each layer's policy network")
    stage2_epochs: int = option(10, "policy-only epochs per round (cheap: cached features)")
    stage2_batch_size: int = option(32, "batch size of stage 2")
    stage2_learning_rate: float = option(3e-3, "learning rate of stage 2 (3e-4 for 2 epochs left the policies "
                                         "ignoring alpha and the confidence inputs)")
    stage3_epochs: int = option(1, "epochs of stage 3 per round (0 skips it: policies only)")
    stage3_batch_size: int = option(32, "batch size of stage 3")
    stage3_learning_rate: float = option(3e-5, "learning rate of stage 3")
    reward: str = option("blend", "paper: -CE - layer cost; ce: -CE alone (the released reference code, where "
                         "alpha has no effect); accuracy: 1 if the chosen exit is right, else 0, - layer cost; "
                         "agreement: 1 if it agrees with the last exit - layer cost; probability: its probability "
                         "of the right label - layer cost; blend: the mean of the accuracy and probability gains "
                         "- layer cost", REWARDS)
    policy_inputs: str = option(",".join(DEFAULT_POLICY_INPUTS), "policy inputs beside the exit feature, comma "
                                f"separated, from {','.join(POLICY_INPUT_NAMES)}; 'none' for the paper's policy on "
                                "the feature alone (a sequence of names in Python)")
    alpha_range: str = option("none", "LOW,HIGH: an alpha-conditioned policy (alpha drawn per instance and given to "
                              "the policy, a dial at inference: evaluate --alpha); none: one fixed alpha "
                              "(a (low, high) pair or None in Python)")
    all_exits_weight: float = option(0.0, "stage 3: add this multiple of the weighted loss over all exits, so "
                                     "exits the policy never picks still learn")
    estimator: str = option("expected", "policy gradient: reinforce samples K rollouts per instance (the paper); "
                            "expected uses the exact expected reward over the exit distribution (no sampling "
                            "noise; stage 3 then weights each exit's loss by how often the policy exits there)",
                            ESTIMATORS)
    policy_entropy: float = option(0.0, "subtract this multiple of the policies' entropy from their loss (keeps "
                                   "them exploring)")
    stage1_objective: str = option("weighted", "stage 1's objective: weighted (PABEE's, the paper's stage 1) or "
                                   "distilled (weighted, plus every exit learning from the last exit's prediction)",
                                   STAGE1_OBJECTIVES)

    @property
    def inputs(self) -> tuple[str, ...]:
        """``policy_inputs`` as a tuple of names (from a comma-separated string or a sequence)."""
        value = self.policy_inputs
        if isinstance(value, str):
            value = [] if value.strip().lower() in ("", "none") else value.split(",")
        return tuple(str(v).strip() for v in value if str(v).strip())

    @property
    def alpha_bounds(self) -> tuple[float, float] | None:
        """``alpha_range`` as (low, high), or None for one fixed alpha."""
        value = self.alpha_range
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        parts: Sequence = value.split(",") if isinstance(value, str) else value
        try:
            low, high = (float(v) for v in parts)
        except (TypeError, ValueError):
            raise bad_value("alpha_range", value, "give LOW,HIGH, e.g. -0.5,2") from None
        return low, high

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise bad_value("estimator", self.estimator, f"choose one of {', '.join(ESTIMATORS)}")
        if self.reward not in REWARDS:
            raise bad_value("reward", self.reward, f"choose one of {', '.join(REWARDS)}")
        if self.stage1_objective not in STAGE1_OBJECTIVES:
            raise bad_value("stage1_objective", self.stage1_objective, f"choose one of {', '.join(STAGE1_OBJECTIVES)}")
        inputs = self.inputs
        unknown = [name for name in inputs if name not in POLICY_INPUT_NAMES]
        if unknown or len(set(inputs)) != len(inputs):
            raise bad_value("policy_inputs", ",".join(inputs), f"choose distinct names from "
                            f"{', '.join(POLICY_INPUT_NAMES)} (none: the paper's policy on the exit feature alone)")
        bounds = self.alpha_bounds
        if bounds is not None:
            low, high = bounds
            if not low < high:
                raise bad_value("alpha_range", f"{low},{high}", "give low < high, e.g. -0.5,2 (an alpha below 0 "
                                "pays for depth: the dial's cautious end)")
            if not low <= self.alpha <= high:
                raise bad_value("alpha", self.alpha, f"the default dial must lie in alpha_range [{low}, {high}]")
        for name in ("all_exits_weight", "policy_entropy"):
            if not getattr(self, name) >= 0:
                raise bad_value(name, getattr(self, name), "use a weight >= 0 (0 turns it off)")
        if self.action not in ACTIONS:
            raise bad_value("action", self.action, f"choose one of {', '.join(ACTIONS)}")
        if bounds is None and not self.alpha >= 0:
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

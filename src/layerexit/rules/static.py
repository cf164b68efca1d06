"""Fixed-depth rules and the oracles that bound what any rule can do."""

from __future__ import annotations

import torch

from ..errors import LayerExitError, bad_value
from .base import RULES, ExitRule


@RULES.register("full")
class Full(ExitRule):
    name = "full"

    def should_exit(self, logits, layer, state):
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)


@RULES.register("static")
class Static(ExitRule):
    name = "static"

    def __init__(self, layer: int = 1):
        """layer: 1-based exit layer"""
        if int(layer) != layer or layer < 1:
            raise bad_value("static.layer", layer, "use a 1-based layer number >= 1")
        self.layer = int(layer)

    def bind(self, num_layers, num_classes):
        if self.layer > num_layers:
            raise bad_value("static.layer", self.layer, f"the model has {num_layers} layers; use 1..{num_layers}")
        return self

    def should_exit(self, logits, layer, state):
        return torch.full((logits.shape[0],), layer + 1 >= self.layer, dtype=torch.bool, device=logits.device)

    @property
    def params(self):
        return {"layer": self.layer}

    @classmethod
    def grid(cls, num_layers, num_classes):
        return [{"layer": k} for k in range(1, num_layers + 1)]


class _Oracle(ExitRule):
    """Exit at the first layer whose prediction equals the row's target (a bound, not a usable rule)."""

    needs_targets = True
    target_name = ""

    def init_state(self, n, targets=None, device=None):
        if targets is None:
            raise LayerExitError(
                f"targets=None is invalid for rule={self.name!r}: pass targets= ({self.target_name}); "
                "oracles bound what a rule can do and need them"
            )
        return {"target": torch.as_tensor(targets, device=device).long()}

    def should_exit(self, logits, layer, state):
        return logits.argmax(dim=-1) == state["target"]


@RULES.register("oracle-gold")
class GoldOracle(_Oracle):
    name = "oracle-gold"
    target_name = "the gold labels"


@RULES.register("oracle-agreement")
class AgreementOracle(_Oracle):
    name = "oracle-agreement"
    target_name = "the full model's predictions"

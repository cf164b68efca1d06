"""Multi-exit training objectives, each a list of stages with per-exit loss weights.

- ``weighted``: PABEE (Zhou et al., NeurIPS 2020) weighted average ``sum_l l * CE_l / sum_l l``, so deeper
  exits, which can be more accurate, count more. Also stage 1 of ConsistentEE (Zeng et al., AAAI 2024).
- ``uniform``: plain average of the exits' cross-entropies.
- ``custom``: user weights, one per exit.
- ``two-stage``: DeeBERT (Xin et al., ACL 2020): first the backbone with the last exit only, then the other
  exits on the frozen backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import catalog
from ..errors import bad_value
from ..registry import Registry

OBJECTIVES: Registry[type["Objective"]] = Registry("objective", catalog.OBJECTIVES)


@dataclass
class Stage:
    """One training stage: loss weights over the exits (0 = that exit is frozen), whether the backbone and
    the policies train, and optionally a loss of its own.

    ``loss(model, batch, labels, index) -> (loss, stats)`` replaces the weighted exit loss; ``index`` holds
    the rows' positions in the training set (for per-instance data such as ConsistentEE's memorized layer)
    and ``stats`` are floats averaged into the epoch's log.
    """

    name: str
    layer_weights: list[float]
    train_backbone: bool = True
    train_policies: bool = False
    loss: Callable | None = None


class Objective:
    name = ""

    def stages(self, num_layers: int) -> list[Stage]:
        raise NotImplementedError


@OBJECTIVES.register("weighted")
class Weighted(Objective):
    name = "weighted"

    def stages(self, num_layers):
        return [Stage("joint", [float(l) for l in range(1, num_layers + 1)])]


@OBJECTIVES.register("uniform")
class Uniform(Objective):
    name = "uniform"

    def stages(self, num_layers):
        return [Stage("joint", [1.0] * num_layers)]


@OBJECTIVES.register("custom")
class Custom(Objective):
    name = "custom"

    def __init__(self, weights: list[float]):
        self.weights = [float(w) for w in weights]

    def stages(self, num_layers):
        if len(self.weights) != num_layers or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise bad_value("layer_weights", self.weights,
                            f"give {num_layers} non-negative weights, one per exit, not all zero")
        return [Stage("joint", self.weights)]


@OBJECTIVES.register("two-stage")
class TwoStage(Objective):
    name = "two-stage"

    def stages(self, num_layers):
        return [
            Stage("backbone", [0.0] * (num_layers - 1) + [1.0], train_backbone=True),
            Stage("exits", [1.0] * (num_layers - 1) + [0.0], train_backbone=False),
        ]


def make_objective(name: str, layer_weights: list[float] | None = None) -> Objective:
    cls = OBJECTIVES.get(name, "objective")
    if cls is Custom:
        if not layer_weights:
            raise bad_value("layer_weights", layer_weights, "objective 'custom' needs one weight per exit")
        return Custom(layer_weights)
    return cls()


def weighted_exit_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """logits (L, B, C), labels (B,), weights (L,) -> (weighted mean CE, per-exit CE (L,) detached)."""
    num_layers, batch, num_classes = logits.shape
    per_exit = F.cross_entropy(
        logits.reshape(-1, num_classes), labels.repeat(num_layers), reduction="none"
    ).view(num_layers, batch).mean(dim=1)  # (L,)
    loss = (weights * per_exit).sum() / weights.sum()
    return loss, per_exit.detach()

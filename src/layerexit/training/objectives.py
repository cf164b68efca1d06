"""Multi-exit training objectives, each a list of stages with per-exit loss weights.

- ``weighted``: PABEE (Zhou et al., NeurIPS 2020) weighted average ``sum_l l * CE_l / sum_l l``, so deeper
  exits, which can be more accurate, count more. Also stage 1 of ConsistentEE (Zeng et al., AAAI 2024).
- ``uniform``: plain average of the exits' cross-entropies.
- ``custom``: user weights, one per exit.
- ``two-stage``: DeeBERT (Xin et al., ACL 2020): first the backbone with the last exit only, then the other
  exits on the frozen backbone.
- ``distilled``: ``weighted``, where every exit but the last also learns from the last exit's (detached)
  prediction, KL(p_L || p_l) at a temperature: self-distillation as in FastBERT (Liu et al., ACL 2020) and
  Phuong & Lampert (ICCV 2019), trained jointly. Early exit is judged on agreeing with the full model, and
  the labels alone do not say which inputs the shallow layers should give up on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    and ``stats`` are floats averaged into the epoch's log. ``settings`` are that loss's own options (they
    join the run's fingerprint, so a resume cannot silently change them).
    """

    name: str
    layer_weights: list[float]
    train_backbone: bool = True
    train_policies: bool = False
    loss: Callable | None = None
    settings: dict = field(default_factory=dict)


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


@OBJECTIVES.register("distilled")
class Distilled(Objective):
    """``weighted`` plus self-distillation: exit l < L minimises ``(1 - weight) * CE_l + weight * T^2 *
    KL(p_L^T || p_l^T)``, the last exit its own CE; the teacher p_L is detached, so the last layer learns
    from the labels only and the shallow exits cannot pull it toward their mistakes."""

    name = "distilled"

    def __init__(self, weight: float = catalog.DISTILL_DEFAULTS["distill_weight"],
                 temperature: float = catalog.DISTILL_DEFAULTS["distill_temperature"]):
        if not 0.0 <= weight <= 1.0:
            raise bad_value("distill_weight", weight, "give a weight between 0 (labels only) and 1 (teacher only)")
        if not temperature > 0:
            raise bad_value("distill_temperature", temperature, "give a positive temperature, e.g. 2")
        self.weight, self.temperature = float(weight), float(temperature)

    def stages(self, num_layers):
        weights = [float(l) for l in range(1, num_layers + 1)]

        def loss(model, batch, labels, index):
            logits = model(**batch)  # (L, B, C)
            return distillation_loss(logits, labels, torch.tensor(weights, device=logits.device),
                                     self.weight, self.temperature)

        return [Stage("joint", weights, loss=loss,
                      settings={"distill_weight": self.weight, "distill_temperature": self.temperature})]


def make_objective(name: str, layer_weights: list[float] | None = None,
                   distill_weight: float = catalog.DISTILL_DEFAULTS["distill_weight"],
                   distill_temperature: float = catalog.DISTILL_DEFAULTS["distill_temperature"]) -> Objective:
    cls = OBJECTIVES.get(name, "objective")
    if cls is Custom:
        if not layer_weights:
            raise bad_value("layer_weights", layer_weights, "objective 'custom' needs one weight per exit")
        return Custom(layer_weights)
    if cls is Distilled:
        return Distilled(distill_weight, distill_temperature)
    return cls()


def exit_cross_entropies(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (L, B, C), labels (B,) -> every exit's mean cross-entropy (L,)."""
    num_layers, batch, num_classes = logits.shape
    return F.cross_entropy(
        logits.reshape(-1, num_classes), labels.repeat(num_layers), reduction="none"
    ).view(num_layers, batch).mean(dim=1)


def weighted_exit_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """logits (L, B, C), labels (B,), weights (L,) -> (weighted mean CE, per-exit CE (L,) detached)."""
    per_exit = exit_cross_entropies(logits, labels)  # (L,)
    loss = (weights * per_exit).sum() / weights.sum()
    return loss, per_exit.detach()


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, weight: float,
                      temperature: float) -> tuple[torch.Tensor, dict]:
    """logits (L, B, C), labels (B,), weights (L,) -> (``Distilled``'s loss, stats: the exits' mean KL to the
    last exit and mean CE). Exits 1..L-1 mix their CE with T^2 * KL(p_L^T || p_l^T) (T^2 keeps the gradient's
    scale independent of T, as in Hinton et al. 2015); the last exit keeps its CE."""
    ce = exit_cross_entropies(logits, labels)  # (L,)
    teacher = F.log_softmax(logits[-1].detach() / temperature, dim=-1)  # (B, C)
    students = F.log_softmax(logits[:-1] / temperature, dim=-1)  # (L-1, B, C)
    kl = (teacher.exp() * (teacher - students)).sum(-1).mean(-1) * temperature ** 2  # (L-1,)
    per_exit = torch.cat([(1 - weight) * ce[:-1] + weight * kl, ce[-1:]])  # (L,)
    loss = (weights * per_exit).sum() / weights.sum()
    stats = {"distill_kl": float(kl.detach().mean()) if len(kl) else 0.0, "exit_ce": float(ce.detach().mean())}
    return loss, stats

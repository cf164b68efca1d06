"""Rules over one exit's softmax: max-prob confidence, margin and entropy.

- max-prob: BranchyNet (Teerapittayanon et al., 2016); EE-LLM (Chen et al., 2024).
- margin: CALM (Schuster et al., NeurIPS 2022), FREE (Bae et al., EMNLP 2023).
- entropy: DeeBERT (Xin et al., ACL 2020).
"""

from __future__ import annotations

import math

import torch

from ..errors import bad_value
from .base import RULES, ExitRule, quantile_thresholds

#: thresholds the confidence rules sweep (those below 1/C are dropped: every row would exit)
CONFIDENCE_GRID = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99,
                   0.995, 0.998, 0.999, 0.9995, 0.9999]


def max_probability(logits: torch.Tensor) -> torch.Tensor:
    """(..., C) logits -> (...) top softmax probability."""
    return logits.softmax(dim=-1).amax(dim=-1)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """(..., C) logits -> (...) top-1 minus top-2 softmax probability."""
    top2 = logits.softmax(dim=-1).topk(2, dim=-1).values  # (..., 2)
    return top2[..., 0] - top2[..., 1]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(..., C) logits -> (...) softmax entropy in nats."""
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def check_threshold(name: str, value: float, low: float, high: float, why: str) -> float:
    """``value`` as a float in [low, high], or a clear error naming ``<name>.threshold`` and ``why``."""
    value = float(value)
    if not (low <= value <= high) or math.isnan(value):
        raise bad_value(f"{name}.threshold", value, f"use a value in [{low}, {high}]; {why}")
    return value


@RULES.register("maxprob")
class MaxProb(ExitRule):
    name = "maxprob"

    def __init__(self, threshold: float = 0.9):
        """threshold in [0, 1]"""
        self.threshold = check_threshold(self.name, threshold, 0.0, 1.0, "above 1 no input could ever exit")

    def should_exit(self, logits, layer, state):
        return max_probability(logits) >= self.threshold

    @property
    def params(self):
        return {"threshold": self.threshold}

    @classmethod
    def grid(cls, num_layers, num_classes):
        return [{"threshold": t} for t in CONFIDENCE_GRID if t >= 1.0 / num_classes]

    @classmethod
    def sweep_grid(cls, logits, signals=None):
        # ends: 0 (every row exits at layer 1) and 1 (only a saturated softmax exits early)
        return [{"threshold": t} for t in quantile_thresholds(max_probability(logits[:-1]), (0.0, 1.0))]


@RULES.register("margin")
class Margin(ExitRule):
    name = "margin"

    def __init__(self, threshold: float = 0.8):
        """threshold in [0, 1]"""
        self.threshold = check_threshold(self.name, threshold, 0.0, 1.0, "above 1 no input could ever exit")

    def should_exit(self, logits, layer, state):
        return margin(logits) >= self.threshold

    @property
    def params(self):
        return {"threshold": self.threshold}

    @classmethod
    def grid(cls, num_layers, num_classes):
        # rounded and de-duplicated: 2 * 0.65 - 1 is 0.30000000000000004, a second "0.3" in the sweep
        values = [0.0, 0.1, 0.2, 0.3, 0.4] + [2 * t - 1 for t in CONFIDENCE_GRID[3:]]
        return [{"threshold": t} for t in sorted({round(v, 6) for v in values})]

    @classmethod
    def sweep_grid(cls, logits, signals=None):
        return [{"threshold": t} for t in quantile_thresholds(margin(logits[:-1]), (0.0, 1.0))]


@RULES.register("entropy")
class Entropy(ExitRule):
    name = "entropy"

    def __init__(self, threshold: float = 0.3):
        """threshold > 0, in nats (log(num_labels) lets every input exit at layer 1)"""
        threshold = float(threshold)
        if not threshold > 0:
            raise bad_value(
                "entropy.threshold", threshold, "use a value > 0: entropy is never below 0, so no input could exit"
            )
        self.threshold = threshold

    def should_exit(self, logits, layer, state):
        return entropy(logits) < self.threshold

    @property
    def params(self):
        return {"threshold": self.threshold}

    @classmethod
    def grid(cls, num_layers, num_classes):
        top = math.log(num_classes)
        fractions = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01, 0.005,
                     0.002, 0.001]
        return [{"threshold": round(f * top, 6)} for f in fractions]

    @classmethod
    def sweep_grid(cls, logits, signals=None):
        # ends: just above log(C) (every row exits at layer 1) and a tiny positive value (only rows whose
        # entropy underflows to 0 exit early); a quantile at 0 moves up to that value (the threshold is > 0)
        top = math.log(logits.shape[-1]) * (1 + 1e-6)
        return [{"threshold": t}
                for t in quantile_thresholds(entropy(logits[:-1]), (1e-12, top), low=1e-12, high=top)]

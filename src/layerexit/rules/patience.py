"""Patience rules: exit when the exits agree (PABEE) or stay confident (PCEE-BERT) for several layers.

- patience: PABEE (Zhou et al., NeurIPS 2020), exit once the prediction has been unchanged for ``patience``
  consecutive layers.
- patience-confidence: PCEE-BERT (Zhang et al., NAACL 2022; not the PCEE of Mofakhami et al.), exit once the
  max-prob confidence has been >= ``threshold`` for ``patience`` consecutive layers.
"""

from __future__ import annotations

import torch

from ..errors import bad_value
from .base import RULES, ExitRule, QUANTILES, quantile_thresholds
from .confidence import CONFIDENCE_GRID, check_threshold, max_probability


def _check_patience(name: str, patience: int) -> int:
    if int(patience) != patience or patience < 1:
        raise bad_value(f"{name}.patience", patience, "use a whole number of layers >= 1")
    return int(patience)


@RULES.register("patience")
class Patience(ExitRule):
    name = "patience"

    def __init__(self, patience: int = 2):
        """patience: whole number of layers >= 1"""
        self.patience = _check_patience(self.name, patience)

    def bind(self, num_layers, num_classes):
        if num_layers < 3:
            raise bad_value(
                "patience.patience",
                self.patience,
                f"with {num_layers} layers no patient exit can come before the last layer; patience needs a model "
                "with at least 3 layers (use maxprob or static instead)",
            )
        if self.patience > num_layers - 2:
            raise bad_value(
                "patience.patience",
                self.patience,
                f"with {num_layers} layers the earliest patient exit is layer patience+1, so use at most "
                f"{num_layers - 2}; larger values can never exit early",
            )
        return self

    def init_state(self, n, targets=None, device=None):
        return {"previous": torch.full((n,), -1, dtype=torch.long, device=device),
                "count": torch.zeros(n, dtype=torch.long, device=device)}

    def should_exit(self, logits, layer, state):
        prediction = logits.argmax(dim=-1)  # (n,)
        same = prediction == state["previous"]
        state["count"] = torch.where(same, state["count"] + 1, torch.zeros_like(state["count"]))
        state["previous"] = prediction
        return state["count"] >= self.patience

    @property
    def params(self):
        return {"patience": self.patience}

    @classmethod
    def grid(cls, num_layers, num_classes):
        return [{"patience": t} for t in range(1, num_layers - 1)]


@RULES.register("patience-confidence")
class PatienceConfidence(ExitRule):
    name = "patience-confidence"

    def __init__(self, threshold: float = 0.9, patience: int = 2):
        """threshold in [0, 1], patience >= 1"""
        self.threshold = check_threshold(self.name, threshold, 0.0, 1.0, "above 1 no input could ever exit")
        self.patience = _check_patience(self.name, patience)

    def bind(self, num_layers, num_classes):
        if self.patience > num_layers - 1:
            raise bad_value(
                "patience-confidence.patience",
                self.patience,
                f"with {num_layers} layers use at most {num_layers - 1}; larger values can never exit early",
            )
        return self

    def init_state(self, n, targets=None, device=None):
        return {"count": torch.zeros(n, dtype=torch.long, device=device)}

    def should_exit(self, logits, layer, state):
        confident = max_probability(logits) >= self.threshold
        state["count"] = torch.where(confident, state["count"] + 1, torch.zeros_like(state["count"]))
        return state["count"] >= self.patience

    @property
    def params(self):
        return {"threshold": self.threshold, "patience": self.patience}

    @classmethod
    def grid(cls, num_layers, num_classes):
        thresholds = [t for t in CONFIDENCE_GRID if t >= 1.0 / num_classes][::2]
        return [{"threshold": t, "patience": p} for p in (1, 2, 3) if p <= num_layers - 1 for t in thresholds]

    @classmethod
    def sweep_grid(cls, logits, signals=None):
        num_layers = logits.shape[0]
        thresholds = quantile_thresholds(max_probability(logits[:-1]), (0.0, 1.0), levels=QUANTILES // 2)
        return [{"threshold": t, "patience": p} for p in (1, 2, 3) if p <= num_layers - 1 for t in thresholds]

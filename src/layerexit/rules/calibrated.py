"""Confidence rules with parameters fitted on validation data: temperature-scaled max-prob and budget.

- ``maxprob-ts``: max-prob confidence after temperature scaling per exit (Guo et al., ICML 2017), each exit's
  temperature fitted on a validation split; the baseline PCEE (Mofakhami et al., 2024, arXiv 2412.19325)
  compares against ("does calibrating the confidence already give control?").
- ``budget``: one max-prob threshold fitted on a validation split so that the average cost of the rows meets
  a budget, in the spirit of EERO (Zhou et al., 2023, "budgeted early exiting"): the cost is average layers
  or average multiply-adds, exit heads included, as a fraction of the full model's.
"""

from __future__ import annotations

import math

import torch

from ..calibration import fit_temperature
from ..errors import bad_value
from .base import RULES
from .confidence import MaxProb
from .fitting import CalibratedRule

from ..catalog import COSTS  # names kept in the torch-free index


@RULES.register("maxprob-ts")
class TemperatureMaxProb(CalibratedRule, MaxProb):
    """Max-prob on ``softmax(z_l / T_l)`` (temperature scaling, Guo et al., ICML 2017), one ``T_l`` per exit
    fitted by NLL on a validation split. Fitted: ``temperatures_`` (L,) float64. The threshold, its check,
    ``params`` and ``grid`` are max-prob's own."""

    name = "maxprob-ts"
    fitted_attributes = ("temperatures_",)

    def fit(self, cache) -> "TemperatureMaxProb":
        """Fit one temperature per exit on a split-tagged validation LogitCache; returns self."""
        self._begin_fit(cache)
        self.temperatures_ = torch.tensor(
            [fit_temperature(cache.logits[layer], cache.labels) for layer in range(cache.logits.shape[0])],
            dtype=torch.float64)  # (L,)
        return self._finish_fit(cache)

    def bind(self, num_layers, num_classes):
        self.check_fitted()
        self._check_depth(num_layers, self.temperatures_.shape[0])
        return self

    def should_exit(self, logits, layer, state):
        scaled = logits.double() / float(self.temperatures_[layer])  # (n, C)
        return scaled.softmax(dim=-1).amax(dim=-1) >= self.threshold

    def with_threshold(self, threshold: float) -> "TemperatureMaxProb":
        """The same temperatures at another threshold (no refit)."""
        other = TemperatureMaxProb(threshold)
        other.__dict__.update({k: v for k, v in vars(self).items() if k.endswith("_")})
        return other


def cumulative_layer_costs(num_layers: int) -> list[float]:
    """Cost of exiting at layer l counted in layers: [1, 2, ..., L]."""
    return [float(l) for l in range(1, num_layers + 1)]


@RULES.register("budget")
class Budget(CalibratedRule):
    """One max-prob threshold τ fitted on a validation split so that the average cost meets ``budget``.

    ``budget`` is a fraction of the full model's cost (0.5 = half). ``cost="layers"`` counts layers;
    ``cost="macs"`` uses ``costs``, the cumulative multiply-adds of exiting at layers 1..L (exit heads
    included, see :func:`layerexit.evaluation.cost.exit_costs`), given here or to :meth:`fit`. Fitting picks
    the largest τ (the most accurate setting, since τ only ever delays exits) whose average cost on the
    fitting data is within the budget; the cost falls in steps of one row's exit, so on N fitting rows the
    fitted cost is within a step of about 1/N of the full cost below the budget.

    Fitted: ``threshold_``, ``costs_`` (L,) cumulative costs as fractions of the full model's,
    ``fit_cost_`` (the average cost fraction reached on the fitting data) and ``fit_avg_layers_``.
    """

    name = "budget"
    fitted_attributes = ("threshold_", "costs_", "fit_cost_", "fit_avg_layers_")

    def __init__(self, budget: float = 0.5, cost: str = "layers", costs: list[float] | None = None):
        """budget: fraction of the full model's cost in (0, 1]; cost 'layers' or 'macs' (macs needs costs, the
        cumulative cost of exiting at each layer)"""
        budget = float(budget)
        if math.isnan(budget) or not 0.0 < budget <= 1.0:
            raise bad_value("budget.budget", budget, "give the budget as a fraction of the full model's cost in "
                            "(0, 1], e.g. 0.5 for half the layers or multiply-adds")
        if cost not in COSTS:
            raise bad_value("budget.cost", cost, f"use one of {', '.join(COSTS)}")
        self.budget = budget
        self.cost = cost
        self.costs = _check_costs(costs) if costs is not None else None

    def fit(self, cache, costs: list[float] | None = None) -> "Budget":
        """Fit τ on a split-tagged validation LogitCache; returns self."""
        self._begin_fit(cache)
        num_layers = cache.logits.shape[0]
        cumulative = self._cumulative(num_layers, costs)  # (L,) fractions of the full cost
        confidence = cache.logits[:-1].double().softmax(dim=-1).amax(dim=-1)  # (L-1, N)
        floor = float(cumulative[0])
        if self.budget < floor - 1e-12:
            raise bad_value("budget.budget", self.budget, f"even exiting every row at layer 1 costs {floor:.4f} of "
                            f"the full model here; ask for at least {floor:.4f}")
        candidates = torch.unique(confidence.flatten())  # ascending
        # cost(τ) is non-decreasing in τ; find the largest candidate (or +inf: never exit) within the budget
        if _average_cost(confidence, cumulative, math.inf) <= self.budget + 1e-12:
            threshold = math.inf
        else:
            low, high = 0, candidates.numel() - 1  # candidates[0] exits every row at layer 1: within budget
            while low < high:
                middle = (low + high + 1) // 2
                if _average_cost(confidence, cumulative, float(candidates[middle])) <= self.budget + 1e-12:
                    low = middle
                else:
                    high = middle - 1
            threshold = float(candidates[low])
        exit_layer = _exit_layers(confidence, threshold)  # (N,) 1-based
        self.threshold_ = threshold
        self.costs_ = cumulative
        self.fit_cost_ = float(cumulative[exit_layer - 1].mean())
        self.fit_avg_layers_ = float(exit_layer.double().mean())
        return self._finish_fit(cache)

    def _cumulative(self, num_layers: int, costs: list[float] | None) -> torch.Tensor:
        if self.cost == "layers":
            values = cumulative_layer_costs(num_layers)
        else:
            values = _check_costs(costs) if costs is not None else self.costs
            if values is None:
                raise bad_value("budget.costs", None, "cost='macs' needs the cumulative multiply-adds of exiting at "
                                "each layer: pass costs=exit_costs(model, seq_len) (layerexit.evaluation.cost)")
        if len(values) != num_layers:
            raise bad_value("budget.costs", f"{len(values)} values", f"give one cumulative cost per layer "
                            f"({num_layers})")
        values = torch.tensor(values, dtype=torch.float64)
        return values / values[-1]  # (L,)

    def bind(self, num_layers, num_classes):
        self.check_fitted()
        self._check_depth(num_layers, self.costs_.shape[0])
        return self

    def should_exit(self, logits, layer, state):
        return logits.double().softmax(dim=-1).amax(dim=-1) >= self.threshold_

    def average_cost(self, exit_layer: torch.Tensor) -> float:
        """Average cost, as a fraction of the full model's, of rows exiting at (N,) 1-based ``exit_layer``."""
        self.check_fitted()
        return float(self.costs_[exit_layer.cpu() - 1].mean())

    @property
    def params(self):
        return {"budget": self.budget, "cost": self.cost, "costs": self.costs}

    @classmethod
    def grid(cls, num_layers, num_classes):
        return [{"budget": b, "cost": "layers", "costs": None} for b in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]


def _check_costs(costs) -> list[float]:
    values = [float(c) for c in costs]
    if not values or any(not math.isfinite(c) or c <= 0 for c in values) or values != sorted(values):
        raise bad_value("budget.costs", costs, "give the cumulative cost of exiting at layers 1..L: positive, "
                        "non-decreasing numbers")
    return values


def _exit_layers(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """(L-1, N) confidences -> (N,) 1-based exit layer under max-prob >= threshold (L if never)."""
    num_exits, n = confidence.shape
    hit = confidence >= threshold  # (L-1, N)
    first = torch.where(hit.any(dim=0), hit.double().argmax(dim=0), torch.full((n,), num_exits))
    return first + 1


def _average_cost(confidence: torch.Tensor, cumulative: torch.Tensor, threshold: float) -> float:
    return float(cumulative[_exit_layers(confidence, threshold) - 1].mean())

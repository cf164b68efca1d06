"""An online budget controller: hold the average cost of live traffic at a budget while the traffic shifts.

The offline ``budget`` rule (:class:`layerexit.rules.Budget`) fits one max-prob threshold on validation data;
when live inputs are harder or easier than the validation split, its cost drifts off the budget. The
controller starts from that fitted threshold and then steers it from the exits it observes:

1. **Actuator, fitted offline.** On the validation confidences it tabulates the cost curve ``c(τ)`` (average
   cost of max-prob exiting at threshold τ, non-decreasing in τ) on a grid of thresholds; asking for a cost
   ``x`` gives the largest grid threshold with ``c(τ) <= x``.
2. **Model mismatch, learned online.** For each served row it records the observed cost and the cost the
   curve predicted for that row's threshold; ``bias`` is their mean difference over the sliding window
   (positive when live traffic is harder than validation data).
3. **Deadbeat window target.** With ``W`` the window and ``H`` the horizon, it asks the next ``H`` rows to
   cost whatever brings the window that will end ``H`` rows from now exactly onto the budget, counting the
   ``W - H`` most recent observed rows and the rows admitted but not yet finished (at their predicted cost):
   ``need = (W * budget - recent - in_flight) / (H - n_in_flight)``, clamped to the feasible range; the
   threshold for new rows is the curve's answer for ``need - bias``.

The threshold is re-chosen every ``update_every`` observed rows; rows keep the threshold they were admitted
with (a row's exit never changes under it). Cost is counted in layers as a fraction of the full model's.
"""

from __future__ import annotations

import collections
import copy
import math
import threading

import torch

from ..errors import bad_value
from ..rules import Budget

GRID = 512


class BudgetController:
    """Online threshold control for a cost budget (see the module docstring).

    ``confidence``: (L-1, N) validation max-prob of exits 1..L-1; ``costs``: (L,) cumulative cost of exiting
    at each layer as fractions of the full model's (``[1/L, 2/L, ..., 1]`` for layers).
    """

    def __init__(self, budget: float, confidence: torch.Tensor, costs: torch.Tensor, window: int = 200,
                 horizon: int = 30, update_every: int = 5, bias_window: int = 50, template: Budget | None = None):
        budget = float(budget)
        if math.isnan(budget) or not 0.0 < budget <= 1.0:
            raise bad_value("budget", budget, "give the budget as a fraction of the full model's cost in (0, 1]")
        if not 1 <= horizon < window:
            raise bad_value("horizon", horizon, f"use 1 <= horizon < window ({window})")
        self.budget, self.window, self.horizon, self.update_every = budget, int(window), int(horizon), int(update_every)
        self.bias_window = int(bias_window)
        self.costs = costs.double()  # (L,)
        self.floor = float(self.costs[0])
        if budget < self.floor - 1e-12:
            raise bad_value("budget", budget, f"exiting every row at layer 1 already costs {self.floor:.4f}; ask for "
                            f"at least {self.floor:.4f}")
        quantiles = torch.linspace(0, 1, GRID, dtype=torch.float64)
        grid = torch.quantile(confidence.double().flatten(), quantiles).unique()
        self.thresholds = torch.cat([grid, torch.tensor([math.inf], dtype=torch.float64)])  # (G,) ascending
        self.curve = torch.stack([_cost(confidence, self.costs, float(t)) for t in self.thresholds])  # (G,)
        self.curve = torch.cummax(self.curve, dim=0).values  # guard monotonicity against ties
        self._template = template
        self._lock = threading.Lock()
        self._observed: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.window)
        self._in_flight: dict[int, float] = {}  # row id -> predicted cost
        self._since_update = 0
        self.bias = 0.0
        self.index = self._index_for(budget)  # the fitted starting threshold (offline budget rule)
        self.start_threshold = self.threshold
        self.history: list[dict] = []  # one entry per update, for plots

    # --- state ----------------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return float(self.thresholds[self.index])

    @property
    def predicted(self) -> float:
        return float(self.curve[self.index])

    def window_cost(self) -> float | None:
        with self._lock:
            return sum(c for c, _ in self._observed) / len(self._observed) if self._observed else None

    # --- the loop -------------------------------------------------------------------------------------
    def admit(self, row_id: int) -> float:
        """A row starts with the current threshold; returns it."""
        with self._lock:
            self._in_flight[row_id] = self.predicted
            return self.threshold

    def cancel(self, row_id: int) -> None:
        """An admitted row that never ran (refused by a full queue)."""
        with self._lock:
            self._in_flight.pop(row_id, None)

    def observe(self, row_id: int, cost: float) -> None:
        """A row finished at ``cost`` (fraction of the full model)."""
        with self._lock:
            predicted = self._in_flight.pop(row_id, self.predicted)
            self._observed.append((float(cost), predicted))
            self._since_update += 1
            if self._since_update >= self.update_every:
                self._since_update = 0
                self._update()

    def _update(self) -> None:
        observed = list(self._observed)
        recent = observed[-self.bias_window:]  # the model mismatch of the latest rows: reacts to a shift quickly
        self.bias = sum(c - p for c, p in recent) / len(recent)
        keep = observed[-(self.window - self.horizon):]
        flying = list(self._in_flight.values())
        coming = max(1, self.horizon - len(flying))
        total = len(keep) + len(flying) + coming  # the window that ends `horizon` rows from now (or shorter)
        need = (total * self.budget - sum(c for c, _ in keep) - sum(p + self.bias for p in flying)) / coming
        need = min(1.0, max(self.floor, need))
        self.index = self._index_for(need - self.bias)
        self.history.append({"observed": len(observed), "window_cost": sum(c for c, _ in observed) / len(observed),
                             "bias": self.bias, "need": need, "threshold": self.threshold})

    def _index_for(self, cost: float) -> int:
        """The largest grid threshold whose validation cost is within ``cost`` (the first one if none is)."""
        within = torch.nonzero(self.curve <= cost + 1e-12).flatten()
        return int(within[-1]) if within.numel() else 0

    # --- as a rule ------------------------------------------------------------------------------------
    def rule(self) -> Budget:
        """A budget rule at the current threshold (a copy of the fitted one; cached per threshold)."""
        return self.rule_at(self.index)

    def rule_at(self, index: int) -> Budget:
        cache = self.__dict__.setdefault("_rules", {})
        if index not in cache:
            rule = copy.copy(self._template) if self._template is not None else _bare_budget(self)
            rule.threshold_ = float(self.thresholds[index])
            cache[index] = rule
        return cache[index]

    def info(self) -> dict:
        return {"budget": self.budget, "window": self.window, "horizon": self.horizon,
                "update_every": self.update_every, "start_threshold": self.start_threshold,
                "threshold": self.threshold, "bias": self.bias, "window_cost": self.window_cost()}

    @classmethod
    def from_cache(cls, budget: float, cache, **kwargs) -> "BudgetController":
        """Fit on a validation :class:`~layerexit.evaluation.cache.LogitCache` (split-tagged, not test data)."""
        fitted = Budget(budget).fit(cache)  # refuses untagged or test splits; layers as the cost
        confidence = cache.logits[:-1].double().softmax(dim=-1).amax(dim=-1)  # (L-1, N)
        return cls(budget, confidence, fitted.costs_, template=fitted, **kwargs)


def _bare_budget(controller: BudgetController) -> Budget:
    rule = Budget(controller.budget)
    rule.costs_, rule.fit_cost_, rule.fit_avg_layers_ = controller.costs, float("nan"), float("nan")
    rule.fit_split_, rule.fit_data_id_ = "online", ""
    return rule


def _cost(confidence: torch.Tensor, costs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Average cost of max-prob exiting at ``threshold`` over (L-1, N) confidences."""
    num_exits, n = confidence.shape
    hit = confidence >= threshold  # (L-1, N)
    first = torch.where(hit.any(dim=0), hit.double().argmax(dim=0), torch.full((n,), num_exits))  # (N,) 0-based
    return costs[first].mean()

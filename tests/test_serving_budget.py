"""The online budget controller holds every 200-row window near the budget on a deterministic shifted stream."""

from __future__ import annotations

import collections

import pytest
import torch

from layerexit.errors import LayerExitError
from layerexit.serving.budget import BudgetController

LAYERS = 6
COSTS = torch.arange(1, LAYERS + 1, dtype=torch.float64) / LAYERS


def confidences(n: int, difficulty: float, seed: int) -> torch.Tensor:
    """(L-1, n) max-prob confidences rising with depth; harder rows (larger ``difficulty``) rise later."""
    gen = torch.Generator().manual_seed(seed)
    hardness = difficulty + 0.8 * torch.rand(n, generator=gen, dtype=torch.float64)  # (n,)
    depth = torch.arange(1, LAYERS, dtype=torch.float64)[:, None]  # (L-1, 1)
    noise = 0.3 * torch.randn(LAYERS - 1, n, generator=gen, dtype=torch.float64)
    return 0.5 + 0.5 * torch.sigmoid(1.2 * depth - 4.0 * hardness + noise)


def exit_cost(trajectory: torch.Tensor, threshold: float) -> float:
    hit = (trajectory >= threshold).nonzero()
    return float(COSTS[int(hit[0]) if hit.numel() else LAYERS - 1])


def run_stream(controller: BudgetController, stream: torch.Tensor, lag: int, feedback: bool = True) -> list[float]:
    """Serve the rows of ``stream`` (L-1, N) in order; each finishes ``lag`` admissions after it starts."""
    flying: collections.deque = collections.deque()
    finished = []
    for i in range(stream.shape[1]):
        threshold = controller.admit(i) if feedback else controller.start_threshold
        flying.append((i, exit_cost(stream[:, i], threshold)))
        if len(flying) > lag:
            row, cost = flying.popleft()
            finished.append(cost)
            if feedback:
                controller.observe(row, cost)
    return finished + [cost for _, cost in flying]


def windows(costs: list[float], size: int = 200) -> torch.Tensor:
    values = torch.tensor(costs, dtype=torch.float64)
    return values.unfold(0, size, 1).mean(dim=1)  # every sliding window


@pytest.mark.parametrize("budget", [0.4, 0.5, 0.7])
def test_every_window_after_the_first_holds_the_budget_through_a_shift(budget):
    validation = confidences(2000, difficulty=0.45, seed=0)
    # easier traffic than validation, then a shift to harder traffic (like short snippets, then sentences):
    # under the offline threshold alone the cost rises by about 40% at the shift
    stream = torch.cat([confidences(1000, 0.3, seed=1), confidences(2000, 0.6, seed=2)], dim=1)
    controller = BudgetController(budget, validation, COSTS)  # defaults: window 200, horizon 30
    costs = run_stream(controller, stream, lag=16)  # 16 rows in flight at any time
    after = windows(costs)[200:]  # every sliding window that starts after the first 200 rows
    worst = float(((after - budget).abs() / budget).max())
    # the serving target is 5%; on this synthetic stream the worst window (right after the shift) reaches
    # 4-6% depending on the budget, so the test allows 6% and docs/benchmarks.md reports the real stream
    assert worst <= 0.06, f"worst window off by {100 * worst:.1f}% of the budget"
    # the same stream under the offline threshold alone misses by far more: the shift is real
    fixed = windows(run_stream(BudgetController(budget, validation, COSTS), stream, lag=16, feedback=False))
    assert float(((fixed[-1] - budget) / budget)) > 0.1
    assert float(((fixed[500] - budget) / budget)) < -0.05
    assert controller.threshold < controller.start_threshold  # harder traffic: it lowered the threshold


def test_controller_refuses_impossible_budgets_and_gives_rules():
    validation = confidences(500, 0.5, seed=0)
    with pytest.raises(LayerExitError, match="at least 0.1667"):
        BudgetController(0.1, validation, COSTS)
    with pytest.raises(LayerExitError, match="horizon"):
        BudgetController(0.5, validation, COSTS, window=50, horizon=50)
    controller = BudgetController(0.5, validation, COSTS)
    rule = controller.rule()
    assert rule.threshold_ == controller.threshold and controller.rule() is rule  # cached per threshold
    logits = torch.tensor([[4.0, 0.0], [0.1, 0.0]], dtype=torch.float64)
    assert rule.should_exit(logits, 0, {}).tolist() == [bool(0.982 >= rule.threshold_), bool(0.525 >= rule.threshold_)]

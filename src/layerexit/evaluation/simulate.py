"""Simulate exit rules over cached logits: every rule and threshold in milliseconds.

The simulator calls the same ``ExitRule.should_exit`` as the engine, one layer at a time, over all rows;
a row's exit is the first layer where the rule said yes (the last layer answers otherwise). Because rules are
row-wise, this gives exactly the engine's exits on the same logits (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rules import ExitRule


@dataclass
class Simulation:
    """exit_layer (N,) 1-based and predictions (N,) of one rule over a cache."""

    exit_layer: torch.Tensor
    predictions: torch.Tensor

    def point(self, labels: torch.Tensor, num_layers: int, params: dict) -> dict:
        """The results.json POINT: params, accuracy, avg_layers, saved_layers (fraction of layers saved)."""
        avg = float(self.exit_layer.double().mean())
        return {
            "params": dict(params),
            "accuracy": float((self.predictions == labels).double().mean()),
            "avg_layers": avg,
            "saved_layers": 1.0 - avg / num_layers,
        }


def simulate(rule: ExitRule, logits: torch.Tensor, targets: torch.Tensor | None = None,
             signals: dict[str, torch.Tensor] | None = None) -> Simulation:
    """logits (L, N, C) of every exit -> where ``rule`` exits each row and what it predicts.

    ``signals`` holds the per-layer values (L, N) of what the rule ``needs`` besides logits (e.g. "policy").
    """
    num_layers, n, num_classes = logits.shape
    rule.bind(num_layers, num_classes)
    keys = {name: rule.signal_key(name) for name in rule.needs}
    missing = [key for key in keys.values() if signals is None or signals.get(key) is None]
    if missing:
        from ..errors import bad_value

        raise bad_value("rule", repr(rule), f"it needs {missing} for every layer; evaluate a model that has them "
                        "(e.g. ConsistentEE policies; an alpha dial needs a cache collected at that alpha)")
    state = rule.init_state(n, targets=targets, device=logits.device)
    exit_layer = torch.full((n,), num_layers, dtype=torch.long, device=logits.device)  # same device as the cache
    running = torch.ones(n, dtype=torch.bool, device=logits.device)
    for index in range(num_layers - 1):
        for name, key in keys.items():
            state[name] = signals[key][index]
        done = rule.should_exit(logits[index], index, state) & running
        exit_layer[done] = index + 1
        running &= ~done
    predictions = logits.argmax(dim=-1).gather(0, (exit_layer - 1).unsqueeze(0)).squeeze(0)  # (N,)
    return Simulation(exit_layer, predictions)


def per_layer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """(L, N, C) logits -> accuracy of each exit."""
    return [float(v) for v in (logits.argmax(dim=-1) == labels).double().mean(dim=1)]

"""Simulate exit rules over cached logits: every rule and threshold in milliseconds.

The simulator calls the same ``ExitRule.should_exit`` as the engine, one layer at a time, over all rows;
a row's exit is the first layer where the rule said yes (the last layer answers otherwise). Because rules are
row-wise, this gives exactly the engine's exits on the same logits (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import bad_value
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
             signals: dict[str, torch.Tensor] | None = None, layers: list[int] | None = None) -> Simulation:
    """logits (L, N, C) of every exit -> where ``rule`` exits each row and what it predicts.

    ``signals`` holds the per-layer values (L, N) of what the rule ``needs`` besides logits (e.g. "policy").
    ``layers``: the 1-based layer of each row of ``logits`` and ``signals`` when the cache holds only some exits
    (the last must be the model's last layer); it must hold every layer where the rule may exit
    (``ExitRule.may_exit_at``), and the rule is asked only there, as the decoder asks a token rule only at its
    candidate layers. A cache of a vocabulary-sized output keeps just those exits.
    """
    count, n, num_classes = logits.shape
    layers = _check_layers(layers, count)
    num_layers = layers[-1]
    rule.bind(num_layers, num_classes)
    held = set(layers)
    absent = [layer for layer in range(1, num_layers) if layer not in held and rule.may_exit_at(layer)]
    if absent:
        raise bad_value("layers", layers, f"{rule!r} may exit after layers {absent}, which the cache lacks; "
                        "collect them too")
    keys = {name: rule.signal_key(name) for name in rule.needs}
    missing = [key for key in keys.values() if signals is None or signals.get(key) is None]
    if missing:
        raise bad_value("rule", repr(rule), f"it needs {missing} for every layer; evaluate a model that has them "
                        "(e.g. ConsistentEE policies; an alpha dial needs a cache collected at that alpha)")
    state = rule.init_state(n, targets=targets, device=logits.device)
    exit_row = torch.full((n,), count - 1, dtype=torch.long, device=logits.device)  # same device as the cache
    running = torch.ones(n, dtype=torch.bool, device=logits.device)
    for row, layer in enumerate(layers[:-1]):
        for name, key in keys.items():
            state[name] = signals[key][row]
        done = rule.should_exit(logits[row], layer - 1, state) & running
        exit_row[done] = row
        running &= ~done
    predictions = logits.argmax(dim=-1).gather(0, exit_row.unsqueeze(0)).squeeze(0)  # (N,)
    exit_layer = torch.tensor(layers, dtype=torch.long, device=logits.device)[exit_row]
    return Simulation(exit_layer, predictions)


def _check_layers(layers: list[int] | None, count: int) -> list[int]:
    """The 1-based layers of a cache's ``count`` exits: 1..count by default, else increasing and one per exit."""
    if layers is None:
        return list(range(1, count + 1))
    layers = [int(layer) for layer in layers]
    if len(layers) != count or layers[0] < 1 or any(b <= a for a, b in zip(layers, layers[1:])):
        raise bad_value("layers", layers, f"give {count} increasing 1-based layers, one per exit of the cache")
    return layers


def per_layer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """(L, N, C) logits -> accuracy of each exit."""
    return [float(v) for v in (logits.argmax(dim=-1) == labels).double().mean(dim=1)]

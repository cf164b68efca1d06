"""Multiply-adds of an encoder with exits, per layer and per exit, exit heads included (see docs/methods.md).

Counted per row of ``T`` tokens, hidden size ``H``, feed-forward size ``I`` and ``C`` classes:

- one encoder layer: Q, K, V and output projections ``4 T H^2``, attention scores and weighted sum ``2 T^2 H``,
  feed-forward ``2 T H I``;
- one exit head: its feature (mean over tokens ``T H``; the pooler ``H^2``; first token 0) plus the classifier
  ``H C``;
- the input: text embeddings are table look-ups (0); a ViT's patch embedding is ``P * (channels * p^2) * H``.

Norms, biases, activations and softmax are left out (they are linear in ``T H`` and small beside the rest).
The early-exit engine computes exit head l at every layer l it passes, so exiting at layer e costs the input
plus layers 1..e plus heads 1..e; the plain model without exits costs the input plus L layers plus one head.
"""

from __future__ import annotations

import torch


def _sizes(model) -> tuple[int, int, int, int]:
    config = model.backbone.config
    hidden = model.adapter.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) or 4 * hidden
    return model.config.num_layers, hidden, int(intermediate), model.config.num_labels


def layer_macs(hidden: int, intermediate: int, tokens: float) -> float:
    """Multiply-adds of one encoder layer for one row of ``tokens`` tokens."""
    return 4 * tokens * hidden**2 + 2 * tokens**2 * hidden + 2 * tokens * hidden * intermediate


def head_macs(hidden: int, num_labels: int, tokens: float, feature: str) -> float:
    """Multiply-adds of one exit head (feature + classifier) for one row."""
    extra = {"mean": tokens * hidden, "pooler": hidden**2, "cls": 0.0}.get(feature, 0.0)
    return extra + hidden * num_labels


def input_macs(model) -> float:
    """The input's multiply-adds per row: 0 for token embeddings, the patch projection for a ViT."""
    config = model.backbone.config
    if getattr(config, "model_type", "") != "vit":
        return 0.0
    patches = (config.image_size // config.patch_size) ** 2
    return float(patches * config.num_channels * config.patch_size**2 * config.hidden_size)


def exit_costs(model, tokens: float) -> list[float]:
    """Cumulative multiply-adds of exiting at layers 1..L (heads passed included) for a row of ``tokens``."""
    num_layers, hidden, intermediate, num_labels = _sizes(model)
    step = layer_macs(hidden, intermediate, tokens) + head_macs(hidden, num_labels, tokens, model.config.exit_feature)
    start = input_macs(model)
    return [start + step * (l + 1) for l in range(num_layers)]


def plain_cost(model, tokens: float) -> float:
    """Multiply-adds of the model run in full without exits (L layers and the last head only)."""
    num_layers, hidden, intermediate, num_labels = _sizes(model)
    return (input_macs(model) + num_layers * layer_macs(hidden, intermediate, tokens)
            + head_macs(hidden, num_labels, tokens, model.config.exit_feature))


def row_costs(model, lengths: torch.Tensor) -> torch.Tensor:
    """(N,) token counts -> (N, L) float64 cumulative multiply-adds of exiting each row at layers 1..L."""
    return torch.tensor([exit_costs(model, float(t)) for t in lengths.tolist()], dtype=torch.float64)


def average_cost(costs: torch.Tensor, exit_layer: torch.Tensor) -> float:
    """Mean over rows of ``costs`` (N, L) at each row's (N,) 1-based exit layer."""
    return float(costs.gather(1, (exit_layer.cpu().long() - 1).view(-1, 1)).mean())

"""Exit heads: the exit feature of a layer and one small classifier per layer."""

from __future__ import annotations

import torch
from torch import nn

from .catalog import FEATURES  # noqa: F401  (names kept in the torch-free index)


def mean_weights(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, T) 0/1 mask -> (n, T) weights that average over real tokens, computed once per row set."""
    mask = attention_mask.to(dtype)
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


class ExitClassifier(nn.Module):
    """``z_l = Linear(hidden, num_labels)(dropout(h_l))`` (the ConsistentEE / PABEE exit classifier)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_labels)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(feature))  # (n, H) -> (n, C)


class PolicyNetwork(nn.Module):
    """ConsistentEE's per-layer exit policy (Zeng et al., AAAI 2024): ``pi_l(h_l) = P(exit at layer l)``.

    ``sigmoid(Linear(hidden_size -> 1)(GELU(Linear(hidden -> hidden_size)(h_l))))`` on the exit feature.
    """

    def __init__(self, hidden: int, hidden_size: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(feature)).squeeze(-1)  # (n, H) -> (n,)

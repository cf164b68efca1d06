"""Exit heads for tokens and the ConsistentEE per-token policy.

Default exit head: the model's own final norm and LM head, shared by every exit (no new parameters; a
per-layer vocabulary head would add L x hidden x vocab, 30 x 576 x 49,152 = 850 M numbers for SmolLM2).
Optional per-exit adapters are small low-rank residual maps applied before the shared head, initialised to
the identity; they are what exit training on a frozen backbone learns.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankAdapter(nn.Module):
    """h + up(gelu(down(h))): a residual low-rank map, exactly the identity at initialisation."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        nn.init.normal_(self.down.weight, std=hidden ** -0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(nn.functional.gelu(self.down(hidden)))  # (..., H)


class LinearExit(nn.Module):
    """A full affine map h -> W h + b, the identity at initialisation; fitted in closed form by
    :func:`~layerexit.generation.train.fit_shortcuts` (Din et al., 2023, "Jump to Conclusions": linear maps from
    layer l to the last layer decode early layers far better than the identity)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(hidden))
            self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)  # (..., H)


class TokenPolicy(nn.Module):
    """ConsistentEE's per-token exit policy (Zeng et al., AAAI 2024, decoder version): one
    ``sigmoid(Linear(hidden -> 1))`` per layer on the final-normed hidden state, P(exit at this layer)."""

    def __init__(self, hidden: int, num_layers: int):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_layers))
        for linear in self.linears:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)  # start undecided (π = 0.5): a few steps tip each layer either way

    def forward(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """(…, H) final-normed hidden after layer ``layer`` (0-based) -> (…,) exit probability."""
        return torch.sigmoid(self.linears[layer](normed).squeeze(-1))

    def all_layers(self, normed: torch.Tensor) -> torch.Tensor:
        """(L, …, H) -> (L, …) exit probabilities of every layer."""
        return torch.stack([self(i, normed[i]) for i in range(len(self.linears))])

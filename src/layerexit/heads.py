"""Exit heads: the exit feature of a layer and one small classifier per layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from .catalog import FEATURES  # noqa: F401  (names kept in the torch-free index)


def mean_weights(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, T) 0/1 mask -> (n, T) weights that average over real tokens, computed once per row set."""
    mask = attention_mask.to(dtype)
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


def pool_feature(adapter, kind: str, hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """A layer's output (n, T, H) -> its exit feature (n, H): ``mean`` over real tokens (``weights`` (n, 1, T)
    from :func:`mean_weights`), the first token (``cls``) or the backbone's pooler, after the adapter's
    normalisation (a pre-norm model's final norm). The engine and exported graphs with exits both use it."""
    hidden = adapter.normalize(hidden)  # identity except for pre-norm models (ViT)
    if kind == "mean":
        return torch.bmm(weights, hidden).squeeze(1)
    if kind == "cls":
        return hidden[:, 0]
    return adapter.pool(hidden)


class ExitClassifier(nn.Module):
    """``z_l = Linear(hidden, num_labels)(dropout(h_l))`` (the ConsistentEE / PABEE exit classifier)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_labels)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.training:  # in eval dropout is the identity: skip its call (the engine calls a head per layer)
            feature = self.dropout(feature)
        return self.linear(feature)  # (n, H) -> (n, C)


#: optional inputs of a ConsistentEE policy beside the exit feature (the paper feeds the feature alone);
#: each is one number per row, computed from the exit's own (detached) logits or its depth
POLICY_INPUTS = {
    "maxprob": "the exit's top softmax probability",
    "margin": "the exit's top-1 minus top-2 probability",
    "entropy": "the exit's softmax entropy divided by log(C), in [0, 1]",
    "layer": "the exit's depth (l + 1) / L",
}


def policy_extras(logits: torch.Tensor | None, index: int, num_layers: int, inputs: list[str] | tuple[str, ...],
                  alpha: torch.Tensor | float | None = None) -> torch.Tensor | None:
    """The policy's extra inputs at exit ``index`` (0-based): (..., C) logits -> (..., len(inputs) [+ 1]).

    The columns follow ``inputs`` (see :data:`POLICY_INPUTS`); an alpha-conditioned policy gets ``alpha``
    (a float or a tensor broadcastable to the rows (...)) as its last column. None when there is nothing to add.
    """
    if not inputs and alpha is None:
        return None
    if logits is None:
        raise ValueError("policy inputs need the exit's logits")
    logits = logits.detach()
    probs = logits.float().softmax(dim=-1)  # (..., C)
    columns = []
    for name in inputs:
        if name == "maxprob":
            columns.append(probs.amax(dim=-1))
        elif name == "margin":
            top2 = probs.topk(2, dim=-1).values  # (..., 2)
            columns.append(top2[..., 0] - top2[..., 1])
        elif name == "entropy":
            logp = logits.float().log_softmax(dim=-1)
            columns.append(-(probs * logp).sum(dim=-1) / math.log(logits.shape[-1]))
        elif name == "layer":
            columns.append(torch.full(probs.shape[:-1], (index + 1) / num_layers, device=logits.device))
        else:
            raise KeyError(name)
    if alpha is not None:
        columns.append(torch.as_tensor(alpha, dtype=torch.float32, device=logits.device).expand(probs.shape[:-1]))
    return torch.stack(columns, dim=-1).to(logits.dtype)  # (..., k)


#: initial weight of alpha's direct path to an alpha-conditioned policy's logit (see :class:`PolicyNetwork`)
ALPHA_GAIN_INIT = 8.0


class PolicyNetwork(nn.Module):
    """ConsistentEE's per-layer exit policy (Zeng et al., AAAI 2024): ``pi_l(h_l) = P(exit at layer l)``.

    ``sigmoid(Linear(hidden_size -> 1)(GELU(Linear(hidden + extra -> hidden_size)([h_l, x_l]))))`` on the exit
    feature ``h_l`` and, when ``extra > 0``, the extra inputs ``x_l`` of :func:`policy_extras` (the exit's own
    confidence signals, its depth, and the layer-cost dial alpha of an alpha-conditioned policy).

    An alpha-conditioned policy (``alpha_gain`` given) also adds ``g * alpha`` to the logit, ``g`` learned from
    ``alpha_gain``. Under the layer-cost reward an input should leave once alpha exceeds a price of its own
    (what continuing would still earn, per layer saved), i.e. ``logit ~ g * alpha - price(h_l, x_l)``; with alpha
    only one of the MLP's ``hidden + extra`` inputs the dial bent every input alike and lost the sharp
    decisions that separately trained high-alpha policies make (docs/benchmarks.md).
    """

    def __init__(self, hidden: int, hidden_size: int = 32, extra: int = 0, alpha_gain: float | None = None):
        super().__init__()
        self.extra = int(extra)
        self.net = nn.Sequential(nn.Linear(hidden + self.extra, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1))
        if alpha_gain is not None and not self.extra:
            raise ValueError("an alpha-conditioned policy takes alpha as its last extra input")
        self.alpha_gain = None if alpha_gain is None else nn.Parameter(torch.tensor(float(alpha_gain)))

    def forward(self, feature: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """(..., H) feature [+ (..., extra) inputs, alpha last when conditioned] -> (...) exit probability."""
        if self.extra:
            if extra is None or extra.shape[-1] != self.extra:
                raise ValueError(f"this policy takes {self.extra} extra inputs beside the feature")
            feature = torch.cat([feature, extra.to(feature.dtype)], dim=-1)
        logit = self.net(feature).squeeze(-1)  # (...)
        if self.alpha_gain is not None:
            logit = logit + self.alpha_gain * extra[..., -1].to(logit.dtype)
        return torch.sigmoid(logit)

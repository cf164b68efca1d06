"""Per-token exit rules for generation.

At each candidate layer of each generated token, a rule sees an :class:`ExitView` (the token's hidden state
after the layer, the previous layer's, and lazily the exit's logits) and answers "exit now". Rules that need
no logits (saturation, policy) never pay for the vocabulary head until the token exits, which matters: the
LM head of SmolLM2 costs about as much as eight of its layers.

Thresholds can decay along the sequence as in CALM (Schuster et al., NeurIPS 2022):
``λ_t = 0.9·λ + 0.1·λ·exp(−4t/N)`` for the t-th generated token of at most N. No exit happens before
``min_layer`` or at a layer outside ``exit_layers``; the last layer always answers.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Iterable

import torch

from ..errors import bad_value
from ..registry import Registry

TOKEN_RULES: Registry[type["TokenRule"]] = Registry("token rule")


class ExitView:
    """What a rule may look at for one token after exit ``layer`` (1-based); logits computed on demand."""

    def __init__(self, model, layer: int, hidden: torch.Tensor, previous: torch.Tensor):
        self.model, self.layer = model, layer
        self.hidden = hidden  # (H,) after this layer
        self.previous = previous  # (H,) before this layer
        self._logits: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        """(V,) next-token logits of this exit (computed once, reused for the emitted token)."""
        if self._logits is None:
            self._logits = self.model.exit_logits(self.layer, self.hidden)
        return self._logits

    @property
    def computed_logits(self) -> torch.Tensor | None:
        return self._logits


class TokenRule:
    """Base class: parameters, candidate layers, CALM's decaying threshold."""

    name: ClassVar[str] = ""
    uses_logits: ClassVar[bool] = True

    def __init__(self, threshold: float = 0.9, min_layer: int = 1, exit_layers: Iterable[int] | None = None,
                 decay: bool = False):
        self.threshold = float(threshold)
        self.min_layer = int(min_layer)
        self.exit_layers = sorted({int(v) for v in exit_layers}) if exit_layers else None
        self.decay = bool(decay)
        self.num_layers = None
        self.horizon = 1

    def bind(self, num_layers: int, max_new_tokens: int) -> "TokenRule":
        """Check layers against the model's depth; remember N for the decaying threshold."""
        if not 1 <= self.min_layer <= num_layers:
            raise bad_value("min_layer", self.min_layer, f"give an exit layer between 1 and {num_layers}")
        for layer in self.exit_layers or []:
            if not 1 <= layer <= num_layers:
                raise bad_value("exit_layers", self.exit_layers, f"every exit layer must be between 1 and {num_layers}")
        self.num_layers = num_layers
        self.horizon = max(1, int(max_new_tokens))
        self._candidates = {l for l in range(self.min_layer, num_layers)
                            if self.exit_layers is None or l in self.exit_layers}
        return self

    def is_candidate(self, layer: int) -> bool:
        return layer in self._candidates

    def threshold_at(self, t: int) -> float:
        """CALM's decaying threshold for the t-th generated token (0-based)."""
        if not self.decay:
            return self.threshold
        return 0.9 * self.threshold + 0.1 * self.threshold * math.exp(-4.0 * t / self.horizon)

    def should_exit(self, view: ExitView, t: int) -> bool:
        raise NotImplementedError

    @property
    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "min_layer": self.min_layer, "exit_layers": self.exit_layers,
                "decay": self.decay}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"


@TOKEN_RULES.register("never", "never exit: the full model (reference path)")
class Never(TokenRule):
    uses_logits = False

    def bind(self, num_layers, max_new_tokens):
        super().bind(num_layers, max_new_tokens)
        self._candidates = set()
        return self

    def should_exit(self, view, t):
        return False


@TOKEN_RULES.register("static", "always exit at min_layer (a truncated model)")
class Static(TokenRule):
    uses_logits = False

    def should_exit(self, view, t):
        return view.layer >= self.min_layer


@TOKEN_RULES.register("maxprob", "exit when max softmax probability >= threshold (EE-LLM)")
class MaxProb(TokenRule):
    def should_exit(self, view, t):
        return float(torch.softmax(view.logits.float(), dim=-1).max()) >= self.threshold_at(t)


@TOKEN_RULES.register("margin", "exit when top-1 minus top-2 probability >= threshold (CALM softmax response)")
class Margin(TokenRule):
    def should_exit(self, view, t):
        top = torch.softmax(view.logits.float(), dim=-1).topk(2).values  # (2,)
        return float(top[0] - top[1]) >= self.threshold_at(t)


@TOKEN_RULES.register("saturation", "exit when cos(h_{l-1}, h_l) >= threshold (CALM hidden-state saturation)")
class Saturation(TokenRule):
    uses_logits = False

    def should_exit(self, view, t):
        cos = torch.nn.functional.cosine_similarity(view.hidden.float(), view.previous.float(), dim=-1)
        return float(cos) >= self.threshold_at(t)


@TOKEN_RULES.register("policy", "ConsistentEE per-token policy: exit when pi_l(h) >= threshold (default 0.5)")
class Policy(TokenRule):
    uses_logits = False

    def __init__(self, threshold: float = 0.5, **kwargs):
        super().__init__(threshold, **kwargs)

    def should_exit(self, view, t):
        return float(view.model.exit_prob(view.layer, view.hidden)) >= self.threshold_at(t)


def make_token_rule(name: str, **params: Any) -> TokenRule:
    """Build a per-token rule by name, e.g. ``make_token_rule("saturation", threshold=0.95, min_layer=8)``."""
    cls = TOKEN_RULES.get(name, "rule")
    try:
        return cls(**params)
    except TypeError:
        raise bad_value(f"{name} parameters", params, "token rules take threshold, min_layer, exit_layers, "
                        "decay") from None

"""Per-token early exit for generation: the encoder side's exit rules, applied to each generated token.

A decoder rule is an ordinary :class:`layerexit.rules.ExitRule` run on one row: max-prob, margin, static, full
(``never``) and the ConsistentEE policy are the very classes the encoder side uses, and CALM's hidden-state
saturation is one more ``ExitRule`` here. At each candidate layer of a generated token the decoder hands the
rule that exit's next-token logits, as a (1, V) row, and the signals the rule declares in ``needs``
(``similarity``: cosine of the token's hidden states before and after the layer; ``policy``: the token
policy's exit probability), computed by :func:`token_signals`; a rule never calls back into the model. A rule
whose ``reads_logits`` is false (saturation, policy) decides without logits, so the vocabulary head, which
can cost as much as several layers, runs only for the layer the token leaves at.

:class:`TokenRule` adds what is particular to tokens, with the generated position ``t`` in the rule's state
(``state["position"]``): no exit before ``min_layer`` or at a layer outside ``exit_layers``, the last layer
always answers, and, with ``decay``, CALM's threshold falling along the sequence (Schuster et al., NeurIPS
2022): ``λ_t = 0.9·λ + 0.1·λ·exp(−4t/N)`` for the t-th generated token of at most N. Layers are 1-based in
every parameter, as on the encoder side; ``ExitRule.should_exit`` receives the 0-based index of the layer run.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable

import torch

from .. import catalog
from ..errors import bad_value
from ..registry import Registry
from ..rules import ExitRule, Full, Margin, MaxProb, PolicyRule, Static

#: builders of the rules a generated token can use: ``(threshold or None, min_layer) -> ExitRule``
TOKEN_RULES: Registry[Callable[[float | None, int], ExitRule]] = Registry("token rule", catalog.TOKEN_RULES)


class Saturation(ExitRule):
    """CALM's hidden-state saturation: exit when cos(h_{l-1}, h_l) >= threshold (a threshold in [-1, 1])."""

    name = "saturation"
    needs = ("similarity",)
    reads_logits = False

    def __init__(self, threshold: float = 0.9):
        threshold = float(threshold)
        if not -1.0 <= threshold <= 1.0:
            raise bad_value("saturation.threshold", threshold, "a cosine lies in [-1, 1]; above 1 no token exits")
        self.threshold = threshold

    def should_exit(self, logits, layer, state):
        return state["similarity"] >= self.threshold

    @property
    def params(self):
        return {"threshold": self.threshold}


def _with_threshold(cls: type[ExitRule]) -> Callable[[float | None, int], ExitRule]:
    return lambda threshold, min_layer: cls() if threshold is None else cls(threshold)


TOKEN_RULES.register("never")(lambda threshold, min_layer: Full())
TOKEN_RULES.register("static")(lambda threshold, min_layer: Static(min_layer))
TOKEN_RULES.register("maxprob")(_with_threshold(MaxProb))
TOKEN_RULES.register("margin")(_with_threshold(Margin))
TOKEN_RULES.register("saturation")(_with_threshold(Saturation))
TOKEN_RULES.register("policy")(_with_threshold(PolicyRule))


class TokenRule(ExitRule):
    """An :class:`ExitRule` applied to generated tokens, with the token options (see the module).

    It is itself an ``ExitRule`` over rows that are token positions: it needs the wrapped rule's signals plus
    ``position`` (each row's generated position t), so :func:`layerexit.evaluation.simulate.simulate` replays
    it over teacher-forced per-layer logits exactly as the decoder runs it (tested)."""

    def __init__(self, rule: ExitRule, min_layer: int = 1, exit_layers: Iterable[int] | None = None,
                 decay: bool = False, name: str | None = None):
        self.rule = rule
        self.name = name or rule.name
        self.min_layer = int(min_layer)
        self.exit_layers = sorted({int(v) for v in exit_layers}) if exit_layers else None
        self.decay = bool(decay)
        self.needs = (*rule.needs, "position")
        self.reads_logits = rule.reads_logits
        self.needs_targets = rule.needs_targets
        self.num_layers = None
        self.horizon = 1
        self._candidates: set[int] = set()

    @property
    def is_full(self) -> bool:
        """Whether no token can exit early (the decoder then runs its plain full path)."""
        return isinstance(self.rule, Full) or not self._candidates

    @property
    def threshold(self) -> float | None:
        return getattr(self.rule, "threshold", None)

    def bind(self, num_layers: int, num_classes: int) -> "TokenRule":
        """Check layers against the model's depth (``num_classes``: the vocabulary size)."""
        if not 1 <= self.min_layer <= num_layers:
            raise bad_value("min_layer", self.min_layer, f"give an exit layer between 1 and {num_layers}")
        for layer in self.exit_layers or []:
            if not 1 <= layer <= num_layers:
                raise bad_value("exit_layers", self.exit_layers, f"every exit layer must be between 1 and {num_layers}")
        self.rule.bind(num_layers, num_classes)
        self.num_layers = num_layers
        self._candidates = set() if isinstance(self.rule, Full) else {
            l for l in range(self.min_layer, num_layers) if self.exit_layers is None or l in self.exit_layers}
        return self

    def with_horizon(self, max_new_tokens: int) -> "TokenRule":
        """Remember N, the most tokens generated, for the decaying threshold; returns self."""
        self.horizon = max(1, int(max_new_tokens))
        return self

    def may_exit_at(self, layer: int) -> bool:
        """Whether a token may exit after ``layer`` (1-based; from ``min_layer``, in ``exit_layers``, before the
        last): the decoder asks the rule only there."""
        return layer in self._candidates

    def threshold_at(self, t):
        """The threshold for the t-th generated token (0-based; a number or a tensor of positions): CALM's
        decaying one with ``decay``."""
        if not self.decay or self.threshold is None:
            return self.threshold
        decay = torch.exp(-4.0 * t / self.horizon) if torch.is_tensor(t) else math.exp(-4.0 * t / self.horizon)
        return 0.9 * self.threshold + 0.1 * self.threshold * decay

    def init_state(self, n: int, targets=None, device=None):
        return self.rule.init_state(n, targets=targets, device=device)

    def should_exit(self, logits: torch.Tensor | None, layer: int, state: dict[str, Any]) -> torch.Tensor:
        """logits (n, V) of exit ``layer`` (0-based; None when the rule does not read them), ``state`` with
        each row's ``position`` and the rule's signals -> (n,) bool."""
        position = state["position"]  # (n,)
        if not self.may_exit_at(layer + 1):
            return torch.zeros(position.shape[0], dtype=torch.bool, device=position.device)
        rule = self.rule
        if self.decay and self.threshold is not None:
            rule = copy.copy(rule)
            rule.threshold = self.threshold_at(position.double()).to(position.device)  # (n,) per-row thresholds
        return rule.should_exit(None if logits is None else logits.float(), layer, state)

    @property
    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "min_layer": self.min_layer, "exit_layers": self.exit_layers,
                "decay": self.decay}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if k != "threshold")
        return f"TokenRule({self.rule!r}, {options})"


def token_signals(model, needs: Iterable[str], layer: int, hidden: torch.Tensor, previous: torch.Tensor) -> dict:
    """The signals a rule declares for tokens after exit ``layer`` (1-based): hidden (n, H) after the layer,
    previous (n, H) before it -> {name: (n,)}, rows as the encoder side's rules expect. The decoder calls it
    for one token, the teacher-forced cache for many (the same computation, so the two agree)."""
    signals = {}
    for name in needs:
        if name == "similarity":
            signals[name] = torch.nn.functional.cosine_similarity(hidden.float(), previous.float(), dim=-1)
        elif name == "policy":
            signals[name] = model.exit_prob(layer, hidden).float()
        elif name != "position":
            raise bad_value("rule needs", name, "a generated token provides 'similarity', 'policy' and 'position'")
    return signals


def make_token_rule(name: str, threshold: float | None = None, min_layer: int = 1,
                    exit_layers: Iterable[int] | None = None, decay: bool = False) -> TokenRule:
    """Build a per-token rule by name, e.g. ``make_token_rule("saturation", threshold=0.95, min_layer=8)``;
    without ``threshold`` the rule's own default."""
    build = TOKEN_RULES.get(name, "rule")
    return TokenRule(build(threshold, int(min_layer)), min_layer, exit_layers, decay, name=name)

"""The exit-rule interface shared by the simulator (cached logits) and the engine (real skipping).

A rule sees, at each layer, the logits of the rows still running and a per-row state (a dict of tensors with
leading dimension n that the engine shrinks with the batch) and answers "exit now" per row, like
transformers' ``StoppingCriteria``. Rules never modify the logits they are given. Rules that learn from
validation data follow scikit-learn's contract (``fit`` returns self and sets attributes ending in ``_``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import catalog
from ..errors import NotFittedError
from ..registry import Registry

RULES: Registry[type["ExitRule"]] = Registry("rule", catalog.RULES)
RuleState = dict[str, torch.Tensor]


class ExitRule:
    """Base class. Subclasses set ``name`` and implement ``should_exit`` (and ``grid`` for sweeps)."""

    name: ClassVar[str] = ""
    #: whether the rule needs per-row targets (the oracles)
    needs_targets: ClassVar[bool] = False
    #: per-layer signals besides the logits that the rule reads from its state, e.g. ("policy",): the
    #: engine and the simulator put the current layer's value under that key before calling should_exit
    needs: ClassVar[tuple[str, ...]] = ()
    #: False for a rule that decides from its ``needs`` alone: the decoder then skips the vocabulary head
    reads_logits: ClassVar[bool] = True
    #: the key of this rule's simulated curve in results.json (default: the rule's name)
    curve_name: ClassVar[str | None] = None

    def bind(self, num_layers: int, num_classes: int) -> "ExitRule":
        """Check the parameters against the model's depth and classes (raise if exiting is impossible)."""
        return self

    def may_exit_at(self, layer: int) -> bool:
        """Whether the rule, once bound, can let a row exit after layer ``layer`` (1-based). Whoever runs the rule
        may skip asking it elsewhere (the decoder does, and so does the simulator over a cache that holds only
        such layers); a rule that keeps state across layers must therefore answer True for every layer."""
        return True

    def signal_key(self, name: str) -> str:
        """The key under which the simulator finds the values of the needed signal ``name`` (e.g. the policy's
        probabilities at this rule's alpha); the engine computes them itself."""
        return name

    def init_state(self, n: int, targets: torch.Tensor | None = None, device=None) -> RuleState:
        return {}

    def should_exit(self, logits: torch.Tensor, layer: int, state: RuleState) -> torch.Tensor:
        """logits (n, C) of exit ``layer`` (0-based) -> (n,) bool; may update ``state`` in place."""
        raise NotImplementedError

    @property
    def params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def grid(cls, num_layers: int, num_classes: int) -> list[dict[str, Any]]:
        """Parameter settings that trace this rule's accuracy-versus-cost curve (fixed, data-free)."""
        return [{}]

    @classmethod
    def sweep_grid(cls, logits: torch.Tensor, signals: dict[str, torch.Tensor] | None = None
                   ) -> list[dict[str, Any]]:
        """Parameter settings for sweeping this rule over cached logits (L, N, C) and ``signals``.

        By default the fixed :meth:`grid`. Rules that threshold one scalar signal override it with thresholds
        at the quantiles of that signal on the cache plus the two ends (every row exits at layer 1 / no row
        exits early), so each curve covers the whole saved-layers range whatever the number of classes.
        """
        num_layers, _, num_classes = logits.shape
        return cls.grid(num_layers, num_classes)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class FittedRule(ExitRule):
    """A rule whose parameters come from validation data: ``fit(...)`` first, then use."""

    def check_fitted(self) -> None:
        fitted = [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]
        if not fitted:
            raise NotFittedError(
                f"rule={self.name!r} is not fitted: call .fit(...) on validation data first "
                "(or `layerexit calibrate`)"
            )


def make_rule(name: str, **params: Any) -> ExitRule:
    """Build a registered rule by name, e.g. ``make_rule("maxprob", threshold=0.9)``."""
    cls = RULES.get(name, "rule")
    try:
        return cls(**params)
    except TypeError as err:
        from ..errors import bad_value

        raise bad_value(f"{name} parameters", params, f"{cls.__name__} takes {cls.__init__.__doc__ or err}") from None


#: quantile levels of a rule's signal used as thresholds by ``sweep_grid`` (plus the grid's two ends)
QUANTILES = 32


def quantile_thresholds(values: torch.Tensor, ends: tuple[float, float], levels: int = QUANTILES,
                        low: float | None = None, high: float | None = None) -> list[float]:
    """Sorted distinct thresholds: ``levels`` evenly spaced quantiles of ``values`` (any shape; the signal at
    the exits a rule can take early, i.e. layers 1..L-1) plus ``ends``, clipped to ``[low, high]``."""
    flat = values.detach().double().flatten()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() > 200_000:  # quantile of a large cache: an evenly strided sample is plenty
        flat = flat[:: flat.numel() // 200_000 + 1]
    qs = torch.quantile(flat, torch.linspace(0, 1, levels, dtype=torch.float64)).tolist() if flat.numel() else []
    out = []
    for v in [*ends, *qs]:
        v = float(v)
        if low is not None:
            v = max(v, low)
        if high is not None:
            v = min(v, high)
        out.append(v)
    return sorted(set(out))

"""ConsistentEE's learned exit policy as an exit rule (Zeng et al., AAAI 2024, arXiv 2312.11882).

Exit at the first layer whose policy probability ``pi_l`` exceeds ``threshold`` (0.5 in the paper); sweeping
the threshold traces the ``consistentee-threshold`` curve. For an alpha-conditioned policy (trained with alpha
drawn per instance and given to the policy as an input) ``alpha`` is a dial: larger alpha, earlier exits; the
sweep over alpha at threshold 0.5 is the ``consistentee`` curve, all from one model.
"""

from __future__ import annotations

import math

from ..errors import bad_value
from .base import RULES, ExitRule, quantile_thresholds

#: the threshold an alpha dial is read at (the paper's)
DIAL_THRESHOLD = 0.5


def policy_key(alpha: float | None) -> str:
    """The signal name of the policy's per-layer probabilities at ``alpha`` (None: the model's default)."""
    return "policy" if alpha is None else f"policy@alpha={float(alpha):.6g}"


def dial_alphas(signals: dict | None) -> list[float]:
    """The alphas at which ``signals`` hold the policy's probabilities (an alpha-conditioned model's cache)."""
    prefix = policy_key(0.0).split("=")[0] + "="
    return sorted(float(k[len(prefix):]) for k in (signals or {}) if k.startswith(prefix))


@RULES.register("consistentee")
class PolicyRule(ExitRule):
    name = "consistentee"
    curve_name = "consistentee-threshold"  # one model, threshold swept (the alpha curve is "consistentee")
    dial_curve_name = "consistentee"
    needs = ("policy",)
    reads_logits = False

    def __init__(self, threshold: float = 0.5, alpha: float | None = None):
        """threshold in [0, 1); alpha, only for alpha-conditioned policies (None: the model's default), a finite
        number in the range the policy was trained on (below 0, where trained so, pays for depth)"""
        threshold = float(threshold)
        if not 0.0 <= threshold < 1.0:
            raise bad_value("policy.threshold", threshold, "use a value in [0, 1); a probability never exceeds 1, "
                            "so with 1 no input could exit")
        if alpha is not None:
            alpha = float(alpha)
            if not math.isfinite(alpha):
                raise bad_value("policy.alpha", alpha, "use a finite alpha in the policy's trained alpha_range "
                                "(larger alpha: earlier exits)")
        self.threshold = threshold
        self.alpha = alpha

    def signal_key(self, name):
        return policy_key(self.alpha) if name == "policy" else name

    def should_exit(self, logits, layer, state):
        return state["policy"] > self.threshold

    @property
    def params(self):
        return {"threshold": self.threshold} if self.alpha is None else {"threshold": self.threshold,
                                                                         "alpha": self.alpha}

    @classmethod
    def grid(cls, num_layers, num_classes):
        return [{"threshold": t} for t in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)]

    @classmethod
    def sweep_grid(cls, logits, signals=None):
        if not signals or signals.get("policy") is None:
            return cls.grid(logits.shape[0], logits.shape[-1])
        high = 1.0 - 1e-9  # the threshold must stay below 1
        return [{"threshold": t} for t in quantile_thresholds(signals["policy"][:-1], (0.0, high), low=0.0,
                                                              high=high)]

    @classmethod
    def dial_grid(cls, signals=None) -> list[dict]:
        """The alpha dial's settings over a cache of an alpha-conditioned model ([] for a fixed-alpha one)."""
        return [{"threshold": DIAL_THRESHOLD, "alpha": a} for a in dial_alphas(signals)]

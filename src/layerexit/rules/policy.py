"""ConsistentEE's learned exit policy as an exit rule (Zeng et al., AAAI 2024, arXiv 2312.11882).

Exit at the first layer whose policy probability ``pi_l(h_l)`` exceeds ``threshold`` (0.5 in the paper);
sweeping the threshold traces the ``consistentee-threshold`` curve.
"""

from __future__ import annotations

from ..errors import bad_value
from .base import RULES, ExitRule


@RULES.register("consistentee", "ConsistentEE: exit where the learned per-layer policy's probability > threshold")
class PolicyRule(ExitRule):
    name = "consistentee"
    curve_name = "consistentee-threshold"  # one model, threshold swept (the alpha sweep is "consistentee")
    needs = ("policy",)
    reads_logits = False

    def __init__(self, threshold: float = 0.5):
        """threshold in [0, 1)"""
        threshold = float(threshold)
        if not 0.0 <= threshold < 1.0:
            raise bad_value("policy.threshold", threshold, "use a value in [0, 1); a probability never exceeds 1, "
                            "so with 1 no input could exit")
        self.threshold = threshold

    def should_exit(self, logits, layer, state):
        return state["policy"] > self.threshold

    @property
    def params(self):
        return {"threshold": self.threshold}

    @classmethod
    def grid(cls, num_layers, num_classes):
        return [{"threshold": t} for t in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)]

"""Exit rules: one interface for the simulator over cached logits and the layer-skipping engine."""

from .base import RULES, ExitRule, FittedRule, make_rule
from .confidence import Entropy, Margin, MaxProb
from .patience import Patience, PatienceConfidence
from .static import AgreementOracle, Full, GoldOracle, Static

#: the rules `layerexit evaluate` sweeps by default (oracles are reported apart)
DEFAULT_SWEEP = ["maxprob", "margin", "entropy", "patience", "patience-confidence", "static"]

__all__ = [
    "RULES", "DEFAULT_SWEEP", "ExitRule", "FittedRule", "make_rule", "MaxProb", "Margin", "Entropy", "Patience",
    "PatienceConfidence", "Static", "Full", "GoldOracle", "AgreementOracle",
]

"""Exit rules: one interface for the simulator over cached logits and the layer-skipping engine."""

from .base import RULES, ExitRule, FittedRule, make_rule
from .calibrated import Budget, TemperatureMaxProb
from .confidence import Entropy, Margin, MaxProb
from .patience import Patience, PatienceConfidence
from .pcee import PCEE, PCEEWS
from .policy import PolicyRule
from .static import AgreementOracle, Full, GoldOracle, Static

#: the rules `layerexit evaluate` sweeps by default (oracles are reported apart; a rule that needs what the
#: model lacks, such as ConsistentEE policies, is left out)
DEFAULT_SWEEP = ["maxprob", "margin", "entropy", "patience", "patience-confidence", "static", "consistentee"]

__all__ = [
    "RULES", "DEFAULT_SWEEP", "ExitRule", "FittedRule", "make_rule", "MaxProb", "Margin", "Entropy", "Patience",
    "PatienceConfidence", "PolicyRule", "Static", "Full", "GoldOracle", "AgreementOracle",
    "PCEE", "PCEEWS", "TemperatureMaxProb", "Budget",
]

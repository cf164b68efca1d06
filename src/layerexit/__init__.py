"""layerexit: early exiting for Hugging Face transformer encoders.

Attach an exit after every layer, train the exits, and stop each input at the first layer whose answer is
good enough, with layers really skipped per input inside batches.
"""

from .data import TextClassificationData, load_data
from .errors import LayerExitError, NotFittedError
from .model import EarlyExitOutput, MultiExitModel
from .pipeline import EarlyExitPipeline, pipeline
from .rules import RULES, ExitRule, make_rule

__version__ = "0.1.0"
__all__ = ["EarlyExitOutput", "EarlyExitPipeline", "ExitRule", "LayerExitError", "MultiExitModel", "NotFittedError", "RULES",
           "TextClassificationData", "load_data", "make_rule", "pipeline"]

"""layerexit: early exiting for Hugging Face transformer encoders.

Attach an exit after every layer, train the exits, and stop each input at the first layer whose answer is
good enough, with layers really skipped per input inside batches.

The model and the rules load on first use (``layerexit.MultiExitModel``), so the command line and the light
modules (errors, data, configs) start without importing torch.
"""

from ._lazy import lazy_attributes
from .data import TextClassificationData, load_data
from .errors import LayerExitError, NotFittedError

__version__ = "0.1.0"
_ATTRIBUTES = {"EarlyExitOutput": ".model", "MultiExitModel": ".model", "RULES": ".rules", "ExitRule": ".rules",
               "make_rule": ".rules"}
__getattr__ = lazy_attributes(__name__, _ATTRIBUTES)
__all__ = ["EarlyExitOutput", "ExitRule", "LayerExitError", "MultiExitModel", "NotFittedError", "RULES",
           "TextClassificationData", "load_data", "make_rule"]

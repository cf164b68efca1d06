"""layerexit: early exiting for Hugging Face transformer encoders.

Attach an exit after every layer, train the exits, and stop each input at the first layer whose answer is
good enough, with layers really skipped per input inside batches.

The model, the pipeline and the rules load on first use (``layerexit.MultiExitModel``, ``layerexit.pipeline``),
so the command line and the light modules (errors, data, configs) start without importing torch; layerexit's
checkpoints are known to transformers' Auto classes as soon as transformers is imported (see
:mod:`layerexit._autoregister`).
"""

from . import _autoregister
from ._lazy import lazy_attributes
from .data import TextClassificationData, load_data
from .errors import LayerExitError, NotFittedError

__version__ = "0.1.0"
_LAZY = {"EarlyExitOutput": ".model", "MultiExitModel": ".model", "EarlyExitPipeline": ".pipelines",
         "pipeline": ".pipelines", "RULES": ".rules", "ExitRule": ".rules", "make_rule": ".rules",
         "upgrade_checkpoint": ".model"}
__all__ = ["EarlyExitOutput", "EarlyExitPipeline", "ExitRule", "LayerExitError", "MultiExitModel", "NotFittedError",
           "RULES", "TextClassificationData", "load_data", "make_rule", "pipeline", "upgrade_checkpoint"]

_autoregister.install()
__getattr__ = lazy_attributes(__name__, _LAZY)

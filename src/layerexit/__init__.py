"""layerexit: early exiting for Hugging Face transformer encoders.

Attach an exit after every layer, train the exits, and stop each input at the first layer whose answer is
good enough, with layers really skipped per input inside batches.

The model, the pipeline and the rules load on first use (``layerexit.MultiExitModel``, ``layerexit.pipeline``);
layerexit's checkpoints are known to transformers' Auto classes as soon as transformers is imported (see
:mod:`layerexit._autoregister`).
"""

import importlib

from . import _autoregister
from .data import TextClassificationData, load_data
from .errors import LayerExitError, NotFittedError

__version__ = "0.1.0"
_LAZY = {"EarlyExitOutput": ".model", "MultiExitModel": ".model", "EarlyExitPipeline": ".pipelines",
         "pipeline": ".pipelines", "RULES": ".rules", "ExitRule": ".rules", "make_rule": ".rules"}
__all__ = ["EarlyExitOutput", "EarlyExitPipeline", "ExitRule", "LayerExitError", "MultiExitModel", "NotFittedError",
           "RULES", "TextClassificationData", "load_data", "make_rule", "pipeline"]

_autoregister.install()


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)

"""Register layerexit with transformers' Auto classes on ``import layerexit``, without importing transformers.

``import layerexit`` stays light (the command line starts without torch or transformers), yet
``AutoConfig`` / ``AutoModel`` / ``AutoModelForSequenceClassification`` / ``transformers.pipeline`` must know the
"layerexit" model type afterwards. :func:`install` does it either way round:

- transformers' auto modules already imported: register now;
- otherwise: a ``sys.meta_path`` finder runs the registration right after Python finishes importing
  ``transformers.models.auto.configuration_auto`` (the config class) and ``...modeling_auto`` (the models).

The model classes are registered as small stand-ins that import :mod:`layerexit.model` /
:mod:`layerexit.pipelines` on first use (``from_pretrained``); those modules register the real classes when
they are imported, replacing the stand-ins.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"


def _register_config() -> None:
    importlib.import_module("layerexit.config")  # registers LayerExitConfig with AutoConfig at import


def _register_models() -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification

    from .config import LayerExitConfig

    for auto, module, name in ((AutoModel, "layerexit.model", "MultiExitModel"),
                               (AutoModelForSequenceClassification, "layerexit.pipelines",
                                "LayerExitForSequenceClassification")):
        if module in sys.modules:  # the real class registered itself already
            continue
        stand_in = type(name, (_Deferred,), {"config_class": LayerExitConfig, "_module": module, "_name": name})
        auto.register(LayerExitConfig, stand_in, exist_ok=True)


class _Deferred:
    """Stands in for a layerexit model class in an Auto mapping until its module is imported."""

    _module = ""
    _name = ""

    @classmethod
    def _real(cls):
        return getattr(importlib.import_module(cls._module), cls._name)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls._real().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args, **kwargs):
        return cls._real()._from_config(*args, **kwargs)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after the module ``name`` has been executed, once."""

    def __init__(self, callbacks: dict):
        self.callbacks = callbacks

    def find_spec(self, fullname, path, target=None):
        callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        del self.callbacks[fullname]
        spec.loader = _CallbackLoader(spec.loader, callback)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, callback):
        self.loader = loader
        self.callback = callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.callback()


def install() -> None:
    """Register now if transformers' auto modules are loaded, else as soon as they are (idempotent)."""
    pending = {}
    for name, callback in ((_CONFIG_AUTO, _register_config), (_MODELING_AUTO, _register_models)):
        if name in sys.modules:
            callback()
        else:
            pending[name] = callback
    if pending and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(pending))

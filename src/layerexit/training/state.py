"""Resume state without pickles: tensors in safetensors files, everything else in JSON.

A run folder may come from someone else, so nothing in it may execute code when a run resumes. The optimizer
state, the scheduler state and the RNG states are nested Python structures of tensors, numbers, tuples and
dicts with integer keys; :func:`flatten` splits such a structure into a flat ``{name: tensor}`` dict
(safetensors) and a JSON skeleton that refers to the tensors by name, and :func:`unflatten` rebuilds it
exactly (tuples stay tuples, integer keys stay integers, numpy arrays come back with their dtype). Loading
reads only safetensors and JSON, so no file in ``state/`` is ever unpickled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import LayerExitError


def flatten(obj, prefix: str = "t") -> tuple[dict, dict[str, torch.Tensor]]:
    """Nested structure -> (JSON-serialisable skeleton, {name: tensor})."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            name = f"{prefix}{len(tensors)}"
            tensors[name] = value.detach().cpu().contiguous()
            return {"__tensor__": name}
        if isinstance(value, np.ndarray):
            name = f"{prefix}{len(tensors)}"
            tensors[name] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value.copy())
            return {"__ndarray__": name, "dtype": str(value.dtype)}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v) for v in value]}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {"__dict__": [[walk(k), walk(v)] for k, v in value.items()]}
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"cannot store a {type(value).__name__} in a resume point")

    return walk(obj), tensors


def unflatten(skeleton, tensors: dict[str, torch.Tensor]):
    """Inverse of :func:`flatten`."""

    def walk(value):
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            if "__tensor__" in value:
                return tensors[value["__tensor__"]]
            if "__ndarray__" in value:
                return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
            if "__tuple__" in value:
                return tuple(walk(v) for v in value["__tuple__"])
            if "__dict__" in value:
                return {_hashable(walk(k)): walk(v) for k, v in value["__dict__"]}
            raise LayerExitError(f"resume point has an unknown entry {sorted(value)}")
        return value

    return walk(skeleton)


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def save_structure(obj, directory: Path, name: str) -> None:
    """Write ``obj`` as ``<name>.json`` (+ ``<name>.safetensors`` when it holds tensors)."""
    skeleton, tensors = flatten(obj)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton) + "\n")


def load_structure(directory: Path, name: str):
    """Read what :func:`save_structure` wrote; tensors via safetensors, the rest via JSON (no unpickling)."""
    path = directory / f"{name}.json"
    try:
        skeleton = json.loads(path.read_text())
        weights = directory / f"{name}.safetensors"
        tensors = load_file(str(weights)) if weights.is_file() else {}
        return unflatten(skeleton, tensors)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LayerExitError(
            f"resume point {str(path)!r} is unreadable ({err}); start over with --no-resume or another --output"
        ) from None


def rng_state() -> dict:
    """The RNG states training draws on (dropout, shuffles): torch (CPU and CUDA), numpy, Python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_tensors(path: str | Path):
    """``torch.load`` for files this package wrote with ``torch.save`` of tensors and plain values: never
    unpickles arbitrary objects (``weights_only=True``); anything else is refused with the file's name."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise LayerExitError(
            f"{str(path)!r} holds objects other than tensors and plain values, so it was not loaded (loading "
            f"could run code; {str(err).splitlines()[0]}); delete it and let layerexit write it again"
        ) from None

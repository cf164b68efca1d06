"""Cheap checks before any model is loaded: output folders, checkpoint files, sequence lengths.

Everything here reads JSON files and file headers only (no torch, no transformers), so a command can refuse a
bad option in well under a second instead of after loading a model or finishing an epoch.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .catalog import DECODER_MODEL_TYPES, ENCODER_MODEL_TYPES
from .errors import LayerExitError, bad_value

#: the configuration file of checkpoints written before config.json (still read, no longer written)
CONFIG_NAME = "layerexit_config.json"
HF_CONFIG_NAME = "config.json"
MODEL_TYPE = "layerexit"
WEIGHTS_NAME = "model.safetensors"
BACKBONE_DIR = "backbone"
#: model types whose position embeddings reserve ``padding_idx + 1`` slots before the first real position
_OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "mpnet": 2}


def writable_folder(flag: str, folder: str | Path) -> Path:
    """Create ``folder`` (and its parents) and prove it writable with a temporary file; returns it."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise bad_value(flag, str(folder), "it is a file; give a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".layerexit-write-test-"):
            pass
    except OSError as err:
        raise bad_value(flag, str(folder), f"it cannot be written ({err.strerror or err}); choose a folder you "
                        "can write to") from None
    return path


def writable_file(flag: str, file: str | Path) -> Path:
    """A file path whose folder exists (or is created) and is writable, and which is not itself a folder."""
    path = Path(file)
    if path.is_dir():
        raise bad_value(flag, str(file), "it is a folder; give a file name, e.g. results/benchmark.json")
    writable_folder(flag, path.parent if str(path.parent) else ".")
    return path


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; a broken or non-object file is refused naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LayerExitError(f"{what} {str(path)!r} is invalid: it cannot be read as JSON ({err}); the file is "
                             "damaged: restore it or save the checkpoint again") from None
    if not isinstance(data, dict):
        raise LayerExitError(f"{what} {str(path)!r} is invalid: it holds {type(data).__name__}, not a JSON object; "
                             "restore it or save the checkpoint again")
    return data


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or damaged safetensors file from its header alone (nothing is loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise LayerExitError(f"weights file {str(path)!r} is invalid: {err}; the file is truncated or damaged "
                             "(an interrupted copy or a full disk?): copy it again or save the checkpoint again") \
            from None


REQUIRED_KEYS = ("num_layers", "num_labels", "model_type", "hidden_size", "exit_feature")
#: what config.json needs beside model_type "layerexit" (labels are id2label)
HF_REQUIRED_KEYS = ("num_layers", "backbone_type", "hidden_size", "exit_feature", "id2label")


def checkpoint_files(folder: str | Path) -> str | None:
    """Which layerexit checkpoint layout ``folder`` has, from its configuration file alone: "config.json"
    (``model_type`` "layerexit"), "layerexit_config.json" (the earlier format) or None (not a checkpoint)."""
    path = Path(folder)
    if (path / HF_CONFIG_NAME).is_file():
        try:
            data = json.loads((path / HF_CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict) and data.get("model_type") == MODEL_TYPE:
            return HF_CONFIG_NAME
    if (path / CONFIG_NAME).is_file():
        return CONFIG_NAME
    return None


def is_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds a layerexit checkpoint (either layout; the weights are not checked)."""
    return checkpoint_files(folder) is not None


def checkpoint_config(flag: str, folder: str | Path) -> dict | None:
    """The layerexit configuration of a classifier checkpoint folder, with its files checked cheaply (None for
    a hub id, which the loader checks): its ``config.json``, or ``layerexit_config.json`` for the earlier format."""
    path = Path(folder)
    if not path.is_dir():
        if is_hub_id(str(folder)):
            return None  # a hub id: the loader fetches (or finds in the cache) and checks it
        raise bad_value(flag, str(folder), "no such checkpoint folder; give a folder written by `layerexit train` "
                        "(e.g. runs/rt/best)")
    if (path / HF_CONFIG_NAME).is_file():
        hf = read_json(path / HF_CONFIG_NAME, "model config")
        if hf.get("model_type") == MODEL_TYPE:  # the transformers layout
            missing = [k for k in HF_REQUIRED_KEYS if k not in hf]
            if missing:
                raise LayerExitError(f"checkpoint config {str(path / HF_CONFIG_NAME)!r} is invalid: it lacks "
                                     f"{missing}; the file is damaged: restore it or save the checkpoint again")
            _check_weights(flag, folder, path)
            return hf
    if not (path / CONFIG_NAME).is_file():
        raise bad_value(flag, str(folder), f"it has neither a layerexit {HF_CONFIG_NAME} (model_type {MODEL_TYPE!r}) "
                        f"nor {CONFIG_NAME}, so it is not a layerexit checkpoint; give a folder written by "
                        "`layerexit train` or MultiExitModel.save_pretrained")
    config = read_json(path / CONFIG_NAME, "checkpoint config")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise LayerExitError(f"checkpoint config {str(path / CONFIG_NAME)!r} is invalid: it lacks {missing}; the "
                             "file is damaged: restore it or save the checkpoint again")
    _check_weights(flag, folder, path)
    return config


def _check_weights(flag: str, folder, path: Path) -> None:
    if not (path / WEIGHTS_NAME).is_file():
        raise bad_value(flag, str(folder), f"it has no {WEIGHTS_NAME}; the checkpoint is incomplete")
    check_safetensors(path / WEIGHTS_NAME)


def is_hub_id(name: str) -> bool:
    """``owner/name``: one slash, no leading ``.``, ``/`` or ``~`` (a path that does not exist is not one)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and " " not in name


def backbone_config(name_or_path: str | Path) -> dict | None:
    """The transformers ``config.json`` of a local model folder or layerexit checkpoint, if there is one.

    Packaged model names resolve to their installed folder; hub names (not on disk) give None.
    """
    from .resources import PACKAGED_MODELS, SPLIT_ARCHIVES, cache_dir

    name = str(name_or_path)
    if name in PACKAGED_MODELS:
        if name in SPLIT_ARCHIVES:
            path = cache_dir() / name  # unpacked on first use; not unpacked just to check an option
        else:
            import importlib.util

            spec = importlib.util.find_spec(PACKAGED_MODELS[name][0])
            if spec is None or not spec.submodule_search_locations:
                return None
            path = Path(spec.submodule_search_locations[0]) / PACKAGED_MODELS[name][1]
    else:
        path = Path(name)
    for candidate in (path / BACKBONE_DIR / "config.json", path / "config.json"):
        if candidate.is_file():
            return read_json(candidate, "model config")
    return None


def max_positions(config: dict) -> int | None:
    """How many tokens a backbone's position embeddings allow (None when it does not say)."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if not isinstance(limit, int):
        return None
    return limit - _OFFSET_POSITIONS.get(config.get("model_type", ""), 0)


def check_max_length(flag: str, max_length: int, model: str | Path) -> None:
    """``--max-length`` between 2 and what the backbone's positions allow."""
    if max_length < 2:
        raise bad_value(flag, max_length, "use at least 2 (the special tokens alone take two); e.g. 128")
    config = backbone_config(model)
    limit = max_positions(config) if config else None
    if limit is not None and max_length > limit:
        raise bad_value(flag, max_length, f"the model {str(model)!r} has {limit} positions; use at most {limit}")


def check_decoder(flag: str, model: str | Path) -> None:
    """Refuse a layerexit classifier checkpoint or an encoder where a decoder LM is needed."""
    path = Path(str(model))
    if not path.is_dir():
        return  # a packaged name or a hub id: the loader says what is wrong
    model_type = ""
    if (path / "config.json").is_file():
        model_type = str(read_json(path / "config.json", "model config").get("model_type", ""))
    if is_checkpoint(path) or model_type.startswith("layerexit"):
        raise bad_value(flag, str(model), "it is a layerexit classifier checkpoint (an encoder with exits); "
                        "generate needs a decoder language model (packaged smollm2-135m, a Llama/Mistral/Qwen2/GPT-2 "
                        "folder); use `layerexit evaluate` or `benchmark` for classifiers")
    if model_type in ENCODER_MODEL_TYPES and model_type not in DECODER_MODEL_TYPES:
        raise bad_value(flag, str(model), f"it is an encoder ({model_type}); generate needs a decoder language "
                        f"model of a supported family ({', '.join(sorted(DECODER_MODEL_TYPES))})")


def resume_hint(output: str | Path | None) -> str:
    """Where an interrupted training run resumes from, in words."""
    if output is None:
        return "nothing was saved"
    folder = Path(output)
    if folder.is_dir() and any(p.is_dir() for p in folder.glob("**/state")):
        return f"the last resume point is in {output}; run the same command again to continue from it"
    return f"no resume point was written yet in {output}; run the same command again to start over"


__all__ = ["backbone_config", "check_decoder", "check_max_length", "check_safetensors", "checkpoint_config",
           "checkpoint_files", "is_checkpoint", "max_positions", "read_json", "resume_hint", "writable_file", "writable_folder"]

"""Shared CLI plumbing: YAML config files with command-line overrides, data options, error handling."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ..data import load_data
from ..errors import LayerExitError, bad_value


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of options (keys as the long option names, - or _); "
                        "options given on the command line override it")


def apply_config(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse with the YAML file's values as defaults, so explicit flags still win."""
    if not getattr(args, "config", None):
        return args
    path = Path(args.config)
    if not path.is_file():
        raise bad_value("--config", args.config, "give the path of an existing YAML file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise bad_value("--config", args.config, f"it is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise bad_value("--config", args.config, "the file must hold a mapping of option: value")
    known = {a.dest for a in parser._actions}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(k for k in values if k not in known or k in ("config", "command", "help"))
    if unknown:  # report every bad key at once
        raise bad_value("--config", args.config, f"unknown keys {unknown}; known: {sorted(known - {'help', 'config'})}")
    parser.set_defaults(**values)
    return parser.parse_args(argv)


def add_data_options(parser: argparse.ArgumentParser, split: str, default_data: str = "rotten-tomatoes") -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=default_data, help="packaged name (rotten-tomatoes), a CSV/TSV/JSONL file, "
                       "a folder with <split>.tsv|csv|jsonl, or a datasets hub name")
    group.add_argument("--split", default=split, help="split to use")
    group.add_argument("--text-column", help="text column (default: sentence, text, sentence1, ...)")
    group.add_argument("--text-pair-column", help="second text of sentence-pair tasks")
    group.add_argument("--label-column", default="label", help="label column")
    group.add_argument("--limit", type=int, help="use only the first N examples")


def data_from(args, split: str | None = None, limit: int | None = None, label_names=None):
    return load_data(args.data, split or args.split, args.text_column, args.text_pair_column, args.label_column,
                     label_names=label_names, limit=limit if limit is not None else args.limit)


def require(args, name: str, example: str) -> None:
    """A required option that may come from the command line or the --config file."""
    if getattr(args, name) in (None, ""):
        raise bad_value(f"--{name.replace('_', '-')}", None, f"it is required, on the command line or in --config; "
                        f"e.g. {example}")


def load_checkpoint(args):
    """The ``--model`` checkpoint (folder or hub id) and its tokenizer, on ``--device`` in ``--dtype`` if the
    command has those options (required, on the command line or in --config)."""
    from transformers import AutoTokenizer

    from ..model import MultiExitModel, resolve_checkpoint

    require(args, "model", "--model runs/rt/best")
    device, dtype = device_and_dtype(args)
    folder = resolve_checkpoint(args.model)
    return MultiExitModel.from_pretrained(folder, dtype=dtype, device=device), AutoTokenizer.from_pretrained(folder)


#: --dtype choices; "auto" keeps the checkpoint's own dtype (float32 for generate's decoders)
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, shared by every command that runs a model."""
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto", help="where the model runs: auto (cuda when available, else "
                       "cpu), cpu, cuda, cuda:N or mps")
    group.add_argument("--dtype", default="auto", choices=DTYPES, help="precision of the weights; auto = as saved")


def device_and_dtype(args):
    """(torch.device, torch.dtype or None for "as saved") from ``--device``/``--dtype``; checked before any
    model loads. Commands without the options get (cpu, None)."""
    import torch

    name = str(getattr(args, "device", None) or "auto")
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise bad_value("--device", name, "give auto, cpu, cuda, cuda:N or mps") from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(device.type, False):
            raise bad_value("--device", name, f"no {device.type} device is available here; use --device cpu (or auto)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise bad_value("--device", name, f"this machine has {torch.cuda.device_count()} CUDA device(s): use "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    dtype = str(getattr(args, "dtype", None) or "auto")
    if dtype not in DTYPES:
        raise bad_value("--dtype", dtype, f"choose one of {', '.join(DTYPES)}")
    return device, (None if dtype == "auto" else getattr(torch, dtype))


def parse_rule_params(pairs: list[str] | None) -> dict:
    """``["threshold=0.9", "patience=2"]`` -> ``{"threshold": 0.9, "patience": 2}``."""
    params = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise bad_value("--param", pair, "write NAME=VALUE, e.g. --param threshold=0.9")
        key, value = pair.split("=", 1)
        params[key.strip()] = yaml.safe_load(value)
    return params


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise bad_value("--batch-sizes", text, "give whole numbers separated by commas, e.g. 1,32") from None


def name_list(text: str | list) -> list[str]:
    if isinstance(text, list):
        return [str(v) for v in text]
    return [v.strip() for v in str(text).split(",") if v.strip()]


__all__ = ["Formatter", "LayerExitError", "add_config_option", "add_device_options", "apply_config",
           "add_data_options", "data_from", "device_and_dtype", "load_checkpoint", "parse_rule_params", "require",
           "int_list", "name_list"]

"""Shared CLI plumbing: YAML config files with command-line overrides, options built from the library's
dataclasses, per-option checks, data options.

Nothing here imports torch: every subcommand's parser is built from light modules, and the option checks run
before any model is loaded (``layerexit.cli.main`` calls them before the command's ``run``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import LayerExitError, bad_value

Check = Callable[[str, Any], None]


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows every option's default exactly once.

    argparse's ``ArgumentDefaultsHelpFormatter`` skips options without help text and appends
    ``(default: None)`` even where the help already says what the default is; this one appends
    ``(default: X)`` to every option that has a real default and does not state it itself.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _shows_default(action) and "default" not in text:
            text = f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):
            action.help = ""  # argparse prints no help line at all for help=None; the default needs one
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    if not action.option_strings or default is None or default is False or default in (argparse.SUPPRESS, ""):
        return False
    return action.nargs != 0  # store_true / store_false / help: the flag's presence is the value


def command_parser(subparsers, name: str, help: str, description: str | None, examples: str,
                   config: bool = True) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``: its one-line ``help`` in ``layerexit --help``, the command module's
    docstring as ``description``, its ``examples`` after the options, and the ``--config`` YAML option unless
    ``config=False``."""
    parser = subparsers.add_parser(name, help=help, description=description, epilog=examples,
                                   formatter_class=Formatter)
    if config:
        add_config_option(parser)
    return parser


# ------------------------------------------------------------------------------------------- option checks


def arg(parser, *flags: str, check: Check | None = None, **kwargs) -> argparse.Action:
    """``parser.add_argument`` plus a ``check(flag, value)`` that main() runs on the final value (flag or YAML)
    before any model is loaded."""
    action = parser.add_argument(*flags, **kwargs)
    action.check = check
    return action


def at_least(minimum: int, what: str = "a whole number") -> Check:
    def check(flag: str, value) -> None:
        values = value if isinstance(value, list) else [value]
        if any(v < minimum for v in values):
            raise bad_value(flag, value, f"use {what} >= {minimum}")

    return check


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False, example: str = "") -> Check:
    """A number in [low, high], with either end open."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(flag: str, value) -> None:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            raise bad_value(flag, value, f"use a number in {interval}{', e.g. ' + example if example else ''}")

    return check


def run_checks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every option's ``check`` on its final value, then the command's own ``check(args)``."""
    for action in parser._actions:
        check = getattr(action, "check", None)
        value = getattr(args, action.dest, None)
        if check is not None and value is not None:
            check(action.option_strings[-1], value)
    command_check = getattr(args, "check", None)
    if command_check is not None:
        command_check(args)


# ------------------------------------------------------------------------------------ options from dataclasses


def add_fields(parser, config_cls, names: list[str], flags: dict[str, str] | None = None,
               checks: dict[str, Check] | None = None) -> None:
    """One option per dataclass field: default, type, help and choices come from the field itself, so the
    command line never restates them. ``flags`` renames an option (field -> flag)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for name in names:
        f = fields[name]
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        if type_name == "bool" and f.default is False:  # a switch: --keep-optimizer-state
            parser.add_argument(flag, dest=name, action="store_true", help=f.metadata.get("help"))
            continue
        kind = {"int": int, "float": float, "str": str}.get(type_name)
        if kind is None:
            raise TypeError(f"{config_cls.__name__}.{name}: only int, float, str and false-by-default bool fields "
                            "become options")
        choices = f.metadata.get("choices")
        arg(parser, flag, dest=name, type=kind, default=f.default,
            choices=list(choices) if choices else None, help=f.metadata.get("help"),
            check=(checks or {}).get(name))


def field_help(config_cls, name: str) -> str:
    return next(f.metadata.get("help") for f in dataclasses.fields(config_cls) if f.name == name)


def config_from(args, config_cls, **overrides):
    """The dataclass from the parsed options of the same names (plus ``overrides``)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return config_cls(**{**values, **overrides})


# ------------------------------------------------------------------------------------------------- YAML files


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of options (keys as the long option names, - or _); "
                        "options given on the command line override it")


def apply_config(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse with the YAML file's values as defaults, so explicit flags still win.

    The file's values go through the same type and choice checks as flags (``epochs: 1.5`` is refused like
    ``--epochs 1.5``), and every error names the key and the file.
    """
    if not getattr(args, "config", None):
        return args
    path = Path(args.config)
    if not path.is_file():
        raise bad_value("--config", args.config, "give the path of an existing YAML file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise bad_value("--config", args.config, f"it is not valid UTF-8 YAML: {err}") from None
    if not isinstance(values, dict):
        raise bad_value("--config", args.config, "the file must hold a mapping of option: value")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(k for k in values if k not in actions or k in ("config", "help"))
    if unknown:  # report every bad key at once
        raise bad_value("--config", args.config, f"unknown keys {unknown}; known: "
                        f"{sorted(set(actions) - {'help', 'config'})}")
    parser.set_defaults(**{k: _coerce(actions[k], v, f"{k} (in --config {args.config})") for k, v in values.items()})
    return parser.parse_args(argv)


def _coerce(action: argparse.Action, value, where: str):
    """A YAML value checked and converted as the command line would convert the same text."""
    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise bad_value(where, value, "use true or false")
        return value  # the option's destination takes the YAML value as it is
    if isinstance(action, argparse._AppendAction) and isinstance(value, dict):  # param: {threshold: 0.9}
        value = [f"{k}={v}" for k, v in value.items()]
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_coerce_one(action, v, where) for v in items]
    if isinstance(value, list) and action.type is None:
        return ",".join(str(v) for v in value)  # comma-separated options (--rules, --batch-sizes) as YAML lists
    return _coerce_one(action, value, where)


def _coerce_one(action: argparse.Action, value, where: str):
    kind = action.type
    if isinstance(value, (dict, list)):
        raise bad_value(where, value, "use a single value")
    if kind is int and (isinstance(value, bool) or (not isinstance(value, int) and not _is_int_text(value))):
        raise bad_value(where, value, "use a whole number")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_float_text(value)):
        raise bad_value(where, value, "use a number")
    converted = kind(value) if kind is not None else str(value)
    if action.choices is not None and converted not in action.choices:
        raise bad_value(where, value, f"choose one of {', '.join(map(str, action.choices))}")
    return converted


def _is_int_text(value) -> bool:
    return isinstance(value, str) and value.strip().lstrip("+-").isdigit()


def _is_float_text(value) -> bool:
    try:
        return isinstance(value, str) and float(value) is not None
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------- data options


def add_data_options(parser: argparse.ArgumentParser, split: str, default_data: str = "rotten-tomatoes") -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=default_data, help="packaged name (rotten-tomatoes), a CSV/TSV/JSONL file, "
                       "a folder with <split>.tsv|csv|jsonl, or a datasets hub name with an optional subset "
                       "(glue/sst2, or glue with --data-config sst2)")
    group.add_argument("--data-config", help="subset (configuration) of a hub data set, e.g. sst2 for glue")
    group.add_argument("--split", default=split, help="split to use")
    group.add_argument("--text-column", help="text column (default: sentence, text, sentence1, ...)")
    group.add_argument("--text-pair-column", help="second text of sentence-pair tasks")
    group.add_argument("--label-column", default="label", help="label column")
    arg(group, "--limit", type=int, check=at_least(1), help="use only the first N examples")
    group.add_argument("--skip-bad-rows", action="store_true", help="skip rows with an empty or missing text or "
                       "label (counted and reported) instead of refusing the file")


def data_from(args, split: str | None = None, limit: int | None = None, label_names=None):
    from ..data import load_data

    data = load_data(args.data, split or args.split, args.text_column, args.text_pair_column, args.label_column,
                     label_names=label_names, limit=limit if limit is not None else args.limit,
                     subset=args.data_config, skip_bad_rows=args.skip_bad_rows)
    if data.info.get("skipped_rows"):
        print(f"layerexit: skipped {data.info['skipped_rows']} row(s) of {args.data} ({data.split}) with an empty or "
              f"missing text or label (--skip-bad-rows): {', '.join(data.info['skipped'])}"
              f"{' ...' if data.info['skipped_rows'] > len(data.info['skipped']) else ''}", file=sys.stderr)
    return data


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


#: rule parameters that take a word, not a number
TEXT_RULE_PARAMS = frozenset({"binning", "smoothing", "cost"})


def parse_rule_params(pairs: list[str] | None) -> dict:
    """``["threshold=0.9", "patience=2"]`` -> ``{"threshold": 0.9, "patience": 2}``; numbers must be numbers."""
    params = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise bad_value("--param", pair, "write NAME=VALUE, e.g. --param threshold=0.9")
        key, value = (s.strip() for s in pair.split("=", 1))
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        numeric = isinstance(parsed, (int, float)) and not isinstance(parsed, bool)
        if key not in TEXT_RULE_PARAMS and not numeric:
            raise bad_value("--param", pair, f"{key} takes a number, e.g. --param {key}=0.9")
        params[key] = parsed
    return params


def int_list(text: str, flag: str = "--batch-sizes") -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise bad_value(flag, text, "give whole numbers separated by commas, e.g. 1,32") from None


def positive_int_list(flag: str) -> Check:
    """A comma-separated list of whole numbers >= 1, e.g. ``--batch-sizes 1,32``."""

    def check(_, value) -> None:
        numbers = int_list(value, flag)
        if not numbers or min(numbers) < 1:
            raise bad_value(flag, value, "give whole numbers >= 1 separated by commas, e.g. 1,32")

    return check


def name_list(text: str | list) -> list[str]:
    if isinstance(text, list):
        return [str(v) for v in text]
    return [v.strip() for v in str(text).split(",") if v.strip()]


def known_names(flag: str, known) -> Check:
    """A comma-separated list of names, each one of ``known``."""

    def check(_, value) -> None:
        unknown = [n for n in name_list(value) if n not in known]
        if unknown:
            raise bad_value(flag, value, f"unknown {unknown}; choose from {', '.join(sorted(known))}")

    return check


__all__ = ["Formatter", "LayerExitError", "add_config_option", "add_data_options", "add_device_options", "add_fields",
           "apply_config", "arg", "at_least", "command_parser", "config_from", "data_from", "device_and_dtype",
           "in_range", "int_list", "known_names", "load_checkpoint", "name_list", "parse_rule_params",
           "positive_int_list", "require", "run_checks"]

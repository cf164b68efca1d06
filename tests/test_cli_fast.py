"""The command line starts light: parsers from torch-free modules, --version, defaults shown once, and the
torch-free index of names (``layerexit.catalog``) equal to the live registries it mirrors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

import layerexit
from layerexit import catalog
from layerexit.cli.main import attach_negative_values, build_parser, main

HEAVY = ("torch", "transformers", "matplotlib", "accelerate", "datasets")


def _modules_after(code: str) -> dict:
    """The heavy modules a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import layerexit.cli.main",
    "from layerexit.cli.main import build_parser; build_parser()",
    "from layerexit.cli.main import main\ntry:\n    main(['list'])\nexcept SystemExit:\n    pass",
    "from layerexit.cli.main import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass",
    "import layerexit, layerexit.training.config, layerexit.consistentee.config, layerexit.preflight",
])
def test_cli_and_light_modules_import_no_heavy_package(code):
    loaded = _modules_after(code)
    assert not any(loaded.values()), f"imported {[m for m, v in loaded.items() if v]}"


def test_lazy_package_attributes_still_resolve():
    from layerexit.training import OBJECTIVES, TrainConfig, train

    assert "weighted" in OBJECTIVES and callable(train) and TrainConfig().epochs >= 1
    assert layerexit.MultiExitModel.__name__ == "MultiExitModel"
    with pytest.raises(AttributeError):
        layerexit.no_such_name  # noqa: B018


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"layerexit {layerexit.__version__}"


@pytest.mark.parametrize("command", sorted(build_parser().subparsers))
def test_every_default_is_shown_exactly_once(command):
    parser = build_parser().subparsers[command]
    text = parser.format_help()
    assert "(default: None)" not in text
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        formatter = parser._get_formatter()
        shown = formatter._expand_help(action) if formatter._get_help_string(action) else ""
        count = shown.count("(default")
        if action.default is None or action.default == "":  # no default to show (an empty text is "none")
            assert count <= 1, (action.option_strings, shown)
        else:
            assert count == 1, (command, action.option_strings, shown)
            if "%(default)" in formatter._get_help_string(action):
                assert str(action.default) in shown


def test_train_help_shows_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--epochs", "2"), ("--batch-size", "32"), ("--learning-rate", "5e-05"), ("--seed", "42"),
                          ("--alpha", "1.0"), ("--copies", "8")):
        assert flag in out and f"(default: {default})" in out


def test_train_options_come_from_the_dataclasses():
    """Defaults and choices are the dataclasses' own: change a field and the command line follows."""
    import dataclasses

    from layerexit.consistentee.config import ConsistentEEConfig
    from layerexit.training.config import TrainConfig

    parser = build_parser().subparsers["train"]
    actions = {a.dest: a for a in parser._actions}
    for config in (TrainConfig, ConsistentEEConfig):
        for f in dataclasses.fields(config):
            if f.name == "hardness":
                assert actions["no_hardness"].default is False
                continue
            assert actions[f.name].default == f.default, f.name
            if f.metadata.get("choices"):
                assert list(actions[f.name].choices) == list(f.metadata["choices"])
    args = parser.parse_args([])
    from layerexit.cli.train import configs

    train_config, cee_config = configs(args)
    assert train_config == TrainConfig() and cee_config == ConsistentEEConfig()


def test_catalog_mirrors_every_live_registry():
    """A rule, backbone, objective or decoder registered without its entry in the torch-free index fails here."""
    from layerexit.backbones import ADAPTERS
    from layerexit.execution import BACKENDS
    from layerexit.generation.adapters import DECODERS
    from layerexit.generation.corpus import CORPORA
    from layerexit.generation.decode import KV_STRATEGIES
    from layerexit.generation.loading import PACKAGED_DECODERS, SMOLLM2
    from layerexit.generation.rules import TOKEN_RULES
    from layerexit.generation.train import OBJECTIVES as GENERATION_OBJECTIVES
    from layerexit.rules import DEFAULT_SWEEP, RULES
    from layerexit.training import OBJECTIVES

    assert dict(RULES.describe()) == catalog.RULES
    assert dict(BACKENDS.describe()) == catalog.BACKENDS
    assert list(DEFAULT_SWEEP) == list(catalog.DEFAULT_SWEEP)
    assert dict(OBJECTIVES.describe()) == catalog.OBJECTIVES
    assert dict(TOKEN_RULES.describe()) == catalog.TOKEN_RULES
    assert {n: (tuple(ADAPTERS.get(n).model_types), d) for n, d in ADAPTERS.describe()} == catalog.BACKBONES
    assert {n: (tuple(DECODERS.get(n).model_types), d) for n, d in DECODERS.describe()} == catalog.DECODERS
    assert tuple(KV_STRATEGIES) == catalog.KV_STRATEGIES
    assert tuple(GENERATION_OBJECTIVES) == catalog.GENERATION_OBJECTIVES
    assert set(PACKAGED_DECODERS) == set(catalog.PACKAGED_DECODERS)
    assert SMOLLM2 == catalog.DEFAULT_DECODER
    assert set(CORPORA) == set(catalog.CORPORA)


def test_list_prints_every_registry_from_the_index(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*catalog.RULES, *catalog.OBJECTIVES, *catalog.BACKBONES, *catalog.DECODERS, *catalog.TOKEN_RULES,
                 *catalog.FEATURES, *catalog.CORPORA, *catalog.PACKAGED_DECODERS, "rotten-tomatoes"]:
        assert name in out


def test_a_part_registers_by_name_and_takes_its_description_from_the_catalog():
    from layerexit.registry import Registry

    registry = Registry("thing", {"a": "an a"})
    registry.register("a")(object)
    assert registry.describe() == [("a", "an a")]
    with pytest.raises(RuntimeError, match="not in layerexit.catalog"):
        registry.register("b")
    with pytest.raises(RuntimeError, match="registered twice"):
        registry.register("a")(object)


def test_negative_numbers_are_option_values(capsys):
    """``--alpha-range -0.5,2`` is a value, not an unknown option; a lone word after a flag stays a word."""
    assert attach_negative_values(["train", "--alpha-range", "-0.5,2", "--alpha", "-0.2", "--seed", "3"]) == [
        "train", "--alpha-range=-0.5,2", "--alpha=-0.2", "--seed", "3"]
    assert attach_negative_values(["--alpha-range", "-.5:2", "--data", "-x"]) == ["--alpha-range=-.5:2", "--data",
                                                                                 "-x"]
    args = build_parser().subparsers["train"].parse_args(
        attach_negative_values(["--method", "consistentee", "--alpha-range", "-0.5,2"]))
    assert args.alpha_range == "-0.5,2"
    # checked before any model loads: the default dial setting must lie in the range
    assert main(["train", "--method", "consistentee", "--alpha-range", "-0.5,2", "--alpha", "-0.7"]) == 2
    assert "--alpha=-0.7 is invalid" in capsys.readouterr().err

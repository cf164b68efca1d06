"""`layerexit list`: the registered backbones, exit rules, objectives, exit features and packaged sources."""

from __future__ import annotations

from ..backbones import ADAPTERS
from ..data import PACKAGED
from ..heads import FEATURES
from ..resources import PACKAGED_MODELS
from ..rules import RULES
from ..training import OBJECTIVES
from .common import Formatter


def add_parser(subparsers):
    p = subparsers.add_parser("list", help="show registered backbones, rules, objectives and packaged data",
                              description=__doc__, epilog="example:\n  layerexit list", formatter_class=Formatter)
    p.set_defaults(run=run)
    return p


def _section(title: str, rows) -> None:
    rows = list(rows)
    width = max(len(name) for name, _ in rows)
    print(title)
    for name, text in rows:
        print(f"  {name:<{width}}  {text}")
    print()


def run(args) -> int:
    _section("backbones (by config.model_type)", [
        (f"{name} ({', '.join(ADAPTERS.get(name).model_types)})", text) for name, text in ADAPTERS.describe()])
    _section("exit rules", RULES.describe())
    _section("objectives", OBJECTIVES.describe())
    _section("exit features", FEATURES.items())
    _section("packaged models", [(name, spec[3]) for name, spec in PACKAGED_MODELS.items()])
    _section("packaged data", PACKAGED.items())
    from ..generation.adapters import DECODERS
    from ..generation.corpus import CORPORA
    from ..generation.loading import PACKAGED_DECODERS
    from ..generation.rules import TOKEN_RULES

    _section("decoders for generation (by config.model_type)", [
        (f"{name} ({', '.join(DECODERS.get(name).model_types)})", text) for name, text in DECODERS.describe()])
    _section("per-token exit rules (generation)", TOKEN_RULES.describe())
    _section("packaged decoders", [(name, spec[3]) for name, spec in PACKAGED_DECODERS.items()])
    _section("packaged corpora (exit training)", [(name, spec[3]) for name, spec in CORPORA.items()])
    return 0

"""`layerexit list`: the registered backbones, exit rules, objectives, exit features and packaged sources."""

from __future__ import annotations

from .. import catalog
from ..data import PACKAGED
from ..resources import PACKAGED_MODELS
from .common import command_parser


def add_parser(subparsers):
    p = command_parser(subparsers, "list", "show registered backbones, rules, objectives and packaged data",
                       __doc__, "example:\n  layerexit list", config=False)
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
    """Prints the torch-free index (``layerexit.catalog``), which the test suite keeps equal to the registries."""
    _section("backbones (by config.model_type)", [
        (f"{name} ({', '.join(types)})", text) for name, (types, text) in sorted(catalog.BACKBONES.items())])
    _section("exit rules", sorted(catalog.RULES.items()))
    _section("objectives", sorted(catalog.OBJECTIVES.items()))
    _section("exit features", catalog.FEATURES.items())
    _section("packaged models", [(name, spec[3]) for name, spec in PACKAGED_MODELS.items()])
    _section("packaged data", PACKAGED.items())
    _section("decoders for generation (by config.model_type)", [
        (f"{name} ({', '.join(types)})", text) for name, (types, text) in sorted(catalog.DECODERS.items())])
    _section("per-token exit rules (generation)", sorted(catalog.TOKEN_RULES.items()))
    _section("packaged decoders", catalog.PACKAGED_DECODERS.items())
    _section("packaged corpora (exit training)", catalog.CORPORA.items())
    return 0

"""How numbers are written in reports and tables: fractions as percent with one decimal, parameters as
``name=value``, Markdown tables with escaped cells. Missing or non-numeric values print as ``n/a``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def pct(value: Any) -> str:
    """Fraction -> percent with one decimal; missing or non-numeric -> 'n/a'."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(value) else f"{100.0 * value:.1f}"


def num(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals; missing or non-numeric -> 'n/a'."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def format_params(params: Mapping[str, Any] | None) -> str:
    """``{"threshold": 0.9, "patience": 2}`` -> ``"threshold=0.9, patience=2"``; empty -> ``"-"``."""
    if not params:
        return "-"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def scalar(value: Any) -> str:
    """A value we know nothing about: bools as yes/no, floats with 4 significant digits, dicts as params."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return format_params(value)
    return str(value)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A Markdown table; ``|`` and newlines inside cells are escaped."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def point_cells(name: str, point: Mapping[str, Any]) -> list[str]:
    """Row cells of a POINT: name, params, accuracy %, avg layers, saved %."""
    return [name, format_params(point.get("params")), pct(point.get("accuracy")), num(point.get("avg_layers")),
            pct(point.get("saved_layers"))]


__all__ = ["format_params", "md_table", "num", "pct", "point_cells", "scalar"]

"""Turn a ``results.json`` dict into a Markdown report, two figures and a terminal table.

The input follows the results contract (see ``evaluate``)::

    {"model", "dataset", "split", "num_layers", "num_examples",
     "full": {"accuracy"}, "per_layer_accuracy": [...],
     "oracles": {"gold": POINT, "agreement": POINT},
     "curves": {rule: [POINT, ...]},           # simulated over cached logits
     "measured": [{"rule", "params", "batch_size", "accuracy", "avg_layers",
                   "speedup_measured", "speedup_ideal", ...}]}
    POINT = {"params", "accuracy", "avg_layers", "saved_layers"}

Accuracies and ``saved_layers`` are fractions in [0, 1]; everything printed is in percent with one decimal.
Extra keys (``tolerance``, ``operating_points``, and extra keys of measured entries such as
``matches_simulation``, ``seconds_full``, ``seconds_early_exit``, ``overhead_heads``) are shown when present
and never required.

Honesty rule (ALGORITHMS.md section 6): curves and oracles are *simulated* from cached logits and are reported
as accuracy, average layers and saved layers only; the word "speed-up" is used only for the measured table,
where the measured wall-clock speed-up stands beside the ideal ``L / avg_layers``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_TOLERANCE = 0.01

# Slack for comparing accuracies against ``full − tolerance``: 0.8 − 0.1 is 0.7000000000000001 in floating
# point, and an accuracy of exactly 70/100 must still count as within ten points of 80/100.
_EPS = 1e-9

_ORACLE_NOTES = {
    "gold": "first layer whose prediction is correct (needs labels; upper bound on accuracy and layers saved)",
    "agreement": "first layer whose prediction equals the last layer's (outputs identical to the full model; "
    "the most layers that can be saved without changing any prediction)",
}

# Keys of a measured entry that get their own named column, in order; any other scalar key is shown as-is.
_MEASURED_CORE = ("rule", "params", "batch_size", "accuracy", "avg_layers", "speedup_measured", "speedup_ideal")
_MEASURED_KNOWN_EXTRAS = {
    "overhead_heads": "exit-head overhead %",
    "matches_simulation": "rows exiting as simulated %",
    "seconds_plain": "full model (s)",
    "seconds_all_heads": "all exits computed (s)",
    "seconds_early_exit": "early exit (s)",
    "num_examples": "examples",
}
#: keys already shown in another form (the ratio column) or not worth a column
_MEASURED_HIDDEN = {"ratio_to_ideal", "rounds", "exit_layers"}


# --------------------------------------------------------------------------------------------------- metrics


def _check_tolerance(tolerance: float) -> float:
    tolerance = float(tolerance)
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(
            f"tolerance must be a finite fraction >= 0 (e.g. 0.01 for one accuracy point), got {tolerance!r}"
        )
    return tolerance


def operating_point(
    curve: Sequence[Mapping[str, Any]], full_accuracy: float, tolerance: float = DEFAULT_TOLERANCE
) -> dict | None:
    """The point of ``curve`` that saves the most layers while staying within ``tolerance`` of the full model.

    Candidates are the points with ``accuracy >= full_accuracy - tolerance`` (compared with a 1e-9 slack for
    floating-point rounding). Among them the largest ``saved_layers`` wins; ties go to the higher accuracy,
    then to the earlier point in ``curve``. Returns the chosen point itself (not a copy), or ``None`` when no
    point qualifies (including an empty curve). ``tolerance`` is a fraction (0.01 = one accuracy point).
    """
    tolerance = _check_tolerance(tolerance)
    floor = float(full_accuracy) - tolerance - _EPS
    best = None
    for point in curve:
        if float(point["accuracy"]) < floor:
            continue
        key = (float(point["saved_layers"]), float(point["accuracy"]))
        if best is None or key > best[0]:  # strict: the earlier point keeps a full tie
            best = (key, point)
    return None if best is None else best[1]


def pareto_front(curve: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The non-dominated points of ``curve``, sorted by ``saved_layers`` ascending (accuracy then descends).

    A point is dominated when another point saves at least as many layers with at least the same accuracy
    (and is better in one of the two). Of points with identical (saved_layers, accuracy) the first is kept.
    """
    ordered = sorted(curve, key=lambda p: (-float(p["saved_layers"]), -float(p["accuracy"])))
    front: list[dict] = []
    best_accuracy = -math.inf
    for point in ordered:  # most layers saved first: keep a point only if it is more accurate than all so far
        if float(point["accuracy"]) > best_accuracy:
            front.append(dict(point))
            best_accuracy = float(point["accuracy"])
    front.reverse()
    return front


def area_under_curve(curve: Sequence[Mapping[str, Any]]) -> float:
    """Area under the best accuracy reachable at each level of saved layers, comparable across rules.

    Exactly: ``integral over s in [0, 1] of best(s) ds`` where ``best(s)`` is the highest accuracy among the
    points that save at least ``s`` of the layers, and 0 where no point saves that much. Over the Pareto
    front sorted by saved layers ``s_1 < ... < s_n`` (accuracies falling), this is
    ``sum_i (s_i - s_{i-1}) * acc_i`` with ``s_0 = 0``: a step function, nothing interpolated, so a rule is
    credited only with savings it actually reached. Every rule is measured over the same [0, 1] axis, so a
    larger area means more accuracy at every budget or more budgets reached. An empty curve gives 0.0.
    """
    area, previous = 0.0, 0.0
    for point in pareto_front(curve):
        saved = float(point["saved_layers"])
        area += max(saved - previous, 0.0) * float(point["accuracy"])
        previous = max(previous, saved)
    return area


# ------------------------------------------------------------------------------------------------ formatting


def _pct(value: Any) -> str:
    """Fraction -> percent with one decimal; missing or non-numeric -> 'n/a'."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(value) else f"{100.0 * value:.1f}"


def _num(value: Any, digits: int = 2) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _scalar(value: Any) -> str:
    """Format an extra value we know nothing about: bools as yes/no, floats with 4 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return format_params(value)
    return str(value)


def format_params(params: Mapping[str, Any] | None) -> str:
    """``{"threshold": 0.9, "patience": 2}`` -> ``"threshold=0.9, patience=2"``; empty -> ``"-"``."""
    if not params:
        return "-"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num_layers(results: Mapping[str, Any]) -> int:
    if results.get("num_layers"):
        return int(results["num_layers"])
    return len(results.get("per_layer_accuracy") or [])


def _effective_tolerance(results: Mapping[str, Any], tolerance: float | None) -> float:
    """Explicit argument first, then ``results["tolerance"]``, then 1 point."""
    if tolerance is None:
        tolerance = results.get("tolerance", DEFAULT_TOLERANCE)
    return _check_tolerance(tolerance)


def operating_points(results: Mapping[str, Any], tolerance: float | None = None) -> dict[str, dict | None]:
    """Operating point of every rule: recomputed from its curve with ``tolerance`` so that the report, the
    table and the figure agree on the tolerance they print. A rule present only in
    ``results["operating_points"]`` (no curve) keeps the stored point."""
    tolerance = _effective_tolerance(results, tolerance)
    full = float(results["full"]["accuracy"])
    points: dict[str, dict | None] = {
        rule: operating_point(curve, full, tolerance) for rule, curve in (results.get("curves") or {}).items()
    }
    for rule, point in (results.get("operating_points") or {}).items():
        points.setdefault(rule, point)
    return points


# ---------------------------------------------------------------------------------------------------- table


def format_table(results: Mapping[str, Any], tolerance: float | None = None) -> str:
    """Plain-text table for the terminal: the full model, each rule's operating point, each oracle.

    Columns: rule, params, accuracy %, avg layers, saved %. The first data row (third line, after the header
    and a rule of dashes) is ``full``. ``tolerance`` defaults to ``results["tolerance"]`` or 0.01. Every row
    except ``full`` is simulated from cached logits.
    """
    tolerance = _effective_tolerance(results, tolerance)
    num_layers = _num_layers(results)
    rows = [["full", "-", _pct(results["full"]["accuracy"]), _num(num_layers), _pct(0.0)]]
    for rule, point in operating_points(results, tolerance).items():
        if point is None:
            rows.append([rule, f"no point within {100 * tolerance:.1f} pt", "n/a", "n/a", "n/a"])
        else:
            rows.append(_point_cells(rule, point))
    for name, point in (results.get("oracles") or {}).items():
        rows.append(_point_cells(f"oracle:{name}", point))

    header = ["rule", "params", "accuracy %", "avg layers", "saved %"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        left = [f"{cells[i]:<{widths[i]}}" for i in range(2)]
        right = [f"{cells[i]:>{widths[i]}}" for i in range(2, len(cells))]
        return "  ".join(left + right).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out.append(
        f"(rules at the most layers saved within {100 * tolerance:.1f} pt of full; simulated over cached logits)"
    )
    return "\n".join(out)


def _point_cells(name: str, point: Mapping[str, Any]) -> list[str]:
    return [
        name,
        format_params(point.get("params")),
        _pct(point.get("accuracy")),
        _num(point.get("avg_layers")),
        _pct(point.get("saved_layers")),
    ]


# --------------------------------------------------------------------------------------------------- report


def _measured_table(results: Mapping[str, Any]) -> str:
    measured = results.get("measured") or []
    if not measured:
        return "_No measured runs in these results._"
    num_layers = _num_layers(results)
    extras_known = [k for k in _MEASURED_KNOWN_EXTRAS if any(k in m for m in measured)]
    extras_other: list[str] = []
    for entry in measured:
        for key, value in entry.items():
            if key in _MEASURED_CORE or key in _MEASURED_KNOWN_EXTRAS or key in _MEASURED_HIDDEN or key in extras_other:
                continue
            if value is None or isinstance(value, (bool, int, float, str, Mapping)):
                extras_other.append(key)

    header = [
        "rule", "params", "batch size", "accuracy %", "avg layers", "saved layers %",
        "measured speed-up", "ideal speed-up (L/avg)", "measured / ideal",
    ]
    header += [_MEASURED_KNOWN_EXTRAS[k] for k in extras_known] + extras_other
    rows = []
    for m in measured:
        avg = m.get("avg_layers")
        saved = 1.0 - float(avg) / num_layers if avg is not None and num_layers else None
        measured_su, ideal_su = m.get("speedup_measured"), m.get("speedup_ideal")
        try:
            ratio = _num(float(measured_su) / float(ideal_su))
        except (TypeError, ValueError, ZeroDivisionError):
            ratio = "n/a"
        row = [
            m.get("rule", "?"), format_params(m.get("params")), m.get("batch_size", "n/a"), _pct(m.get("accuracy")),
            _num(avg), _pct(saved),
            f"{_num(measured_su)}x" if measured_su is not None else "n/a",
            f"{_num(ideal_su)}x" if ideal_su is not None else "n/a",
            ratio,
        ]
        for key in extras_known:
            value = m.get(key)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key.startswith("seconds_") and numeric:
                row.append(f"{value:.3f}")
            elif key in ("overhead_heads", "matches_simulation") and numeric:
                row.append(f"{100 * value:+.1f}" if key == "overhead_heads" else _pct(value))
            else:
                row.append(_scalar(value))
        row += [_scalar(m.get(k)) for k in extras_other]
        rows.append(row)
    table = _md_table(header, rows)
    notes = []
    notes.append(
        "Exit-head overhead: time with every exit computed (the engine with the `full` rule) over the plain model "
        "(backbone + last exit), minus one. Rows exiting as simulated: the share of rows whose measured exit layer "
        "equals the simulation's on the cached logits (float32 batches of other shapes can move a row that sits "
        "on a threshold)."
    )
    if any(m.get("matches_simulation") is False or (isinstance(m.get("matches_simulation"), float)
                                                     and m["matches_simulation"] < 1.0) for m in measured):
        notes.append(
            "**Note:** in at least one measured run some rows did not exit at the same layer as in the "
            "simulation; its accuracy and average layers may differ slightly from the simulated table."
        )
    return "\n\n".join([table, *notes])


def write_report(results: Mapping[str, Any], folder: str | Path, tolerance: float | None = None) -> Path:
    """Write ``report.md``, ``tradeoff.png`` and ``per_layer_accuracy.png`` into ``folder``; return the
    report's path.

    ``tolerance`` (a fraction; default ``results["tolerance"]`` if present, else 0.01) picks each rule's
    operating point: the most layers saved with accuracy >= full − tolerance. The figures are linked with
    relative paths, so the folder can be moved as a whole.
    """
    from .plots import plot_per_layer, plot_tradeoff  # imported here: plots pulls in matplotlib

    tolerance = _effective_tolerance(results, tolerance)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    num_layers = _num_layers(results)
    full_accuracy = float(results["full"]["accuracy"])

    plot_tradeoff(results, folder / "tradeoff.png", tolerance=tolerance)
    plot_per_layer(results, folder / "per_layer_accuracy.png")

    model = results.get("model", "model")
    dataset = results.get("dataset", "dataset")
    split = results.get("split", "?")
    n = results.get("num_examples", "?")
    parts: list[str] = [
        f"# Early-exit report: {model} on {dataset} ({split}, {n} examples)",
        "**What is simulated and what is measured.** The per-layer accuracies, the oracles and the "
        "\"Simulated over cached logits\" table are *simulated*: every exit was run once over the split, its "
        "logits were cached, and each rule was replayed over the cache; their \"saved layers\" count layers, "
        "not time. Only the \"Measured (real layer skipping, wall clock)\" table is *measured*: the model "
        "really skipped layers and both the full model and the early-exit model were timed in the same run. "
        "Both figures (`tradeoff.png`, `per_layer_accuracy.png`) come from the cached logits.",
        "## Full model",
        f"- Accuracy: **{_pct(full_accuracy)}%** with all {num_layers} layers.\n"
        f"- Tolerance for operating points: {100 * tolerance:.1f} accuracy points "
        f"(floor {_pct(full_accuracy - tolerance)}%).",
    ]

    per_layer = results.get("per_layer_accuracy") or []
    parts.append("## Per-layer accuracy (each exit alone)")
    if per_layer:
        rows = [
            [i + 1, _pct(acc), f"{100 * (float(acc) - full_accuracy):+.1f}",
             _pct(1 - (i + 1) / num_layers) if num_layers else "n/a"]
            for i, acc in enumerate(per_layer)
        ]
        parts.append(_md_table(["exit layer", "accuracy %", "vs full (pt)", "saved layers %"], rows))
    else:
        parts.append("_No per-layer accuracies in these results._")
    parts.append("![Per-layer accuracy](per_layer_accuracy.png)")

    parts.append("## Oracles (simulated bounds, not deployable rules)")
    oracles = results.get("oracles") or {}
    if oracles:
        rows = [
            [name, _pct(p.get("accuracy")), _num(p.get("avg_layers")), _pct(p.get("saved_layers")),
             _ORACLE_NOTES.get(name, "")]
            for name, p in oracles.items()
        ]
        parts.append(_md_table(["oracle", "accuracy %", "avg layers", "saved layers %", "exits at"], rows))
    else:
        parts.append("_No oracles in these results._")

    parts.append("## Simulated over cached logits")
    curves = results.get("curves") or {}
    points = operating_points(results, tolerance)
    if points:
        rows = []
        for rule, point in points.items():
            curve = curves.get(rule) or []
            auc = _num(area_under_curve(curve), 3) if len(curve) else "n/a"
            front = pareto_front(curve)
            span = f"{_pct(front[0]['saved_layers'])}–{_pct(front[-1]['saved_layers'])}" if front else "n/a"
            if point is None:
                rows.append([rule, f"none within {100 * tolerance:.1f} pt", "n/a", "n/a", "n/a", auc, span, len(curve)])
            else:
                rows.append([
                    rule, format_params(point.get("params")), _pct(point.get("accuracy")),
                    _num(point.get("avg_layers")), _pct(point.get("saved_layers")), auc, span, len(curve),
                ])
        parts.append(
            f"Operating point: the point of each rule's sweep that saves the most layers with accuracy within "
            f"{100 * tolerance:.1f} pt of the full model. Area: the integral over saved layers s in [0, 1] of the "
            f"best accuracy among the sweep's points that save at least s (0 where none does); the same axis for "
            f"every rule, so areas compare directly (see `area_under_curve`)."
        )
        parts.append(_md_table(
            ["rule", "operating point params", "accuracy %", "avg layers", "saved layers %", "area",
             "front spans saved %", "points"],
            rows,
        ))
    else:
        parts.append("_No simulated curves in these results._")
    parts.append("![Accuracy versus saved layers (simulated)](tradeoff.png)")

    parts.append("## Measured (real layer skipping, wall clock)")
    parts.append(
        "Speed-up = full-model time / early-exit time, both measured in the same process and run. The ideal "
        "speed-up L / avg layers assumes layers are all the cost and exits are free; measured / ideal shows how "
        "much of it the implementation realises."
    )
    parts.append(_measured_table(results))

    path = folder / "report.md"
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path

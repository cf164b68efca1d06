"""Write a results dict as a Markdown report (``report.md``) with its figures.

The input follows the results contract (see ``layerexit.evaluation.evaluate``)::

    {"model", "dataset", "split", "num_layers", "num_examples",
     "full": {"accuracy"}, "per_layer_accuracy": [...],
     "oracles": {"gold": POINT, "agreement": POINT},
     "curves": {rule: [POINT, ...]},           # simulated over cached logits
     "measured": [{"rule", "params", "batch_size", "accuracy", "avg_layers",
                   "speedup_measured", "speedup_ideal", ...}],
     "controllability": {...}}                 # optional, see layerexit.evaluation.controllability
    POINT = {"params", "accuracy", "avg_layers", "saved_layers"}

Accuracies and ``saved_layers`` are fractions in [0, 1]; everything printed is in percent with one decimal.
Extra keys (``tolerance``, ``operating_points``, and extra keys of measured entries such as
``matches_simulation``, ``seconds_plain``, ``overhead_heads``, ``speedup_spread``, ``warnings``) are shown when
present and never required.

Honesty rule: curves and oracles are *simulated* from cached logits and are reported as accuracy, average
layers and saved layers only; the word "speed-up" is used only for the measured table, where the measured
wall-clock speed-up stands beside the ideal ``L / avg_layers``, with its spread over rounds and a warning
where it is implausible (see ``layerexit.evaluation.timing``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..io import write_text_atomic
from .formatting import format_params, md_table, num, pct, scalar
from .metrics import area_under_curve, effective_tolerance, num_layers, operating_points, pareto_front

_ORACLE_NOTES = {
    "gold": "first layer whose prediction is correct (needs labels; upper bound on accuracy and layers saved)",
    "agreement": "first layer whose prediction equals the last layer's (outputs identical to the full model; "
    "the most layers that can be saved without changing any prediction)",
}

# Keys of a measured entry that get their own named column, in order; any other scalar key is shown as-is.
_MEASURED_CORE = ("rule", "params", "batch_size", "accuracy", "avg_layers", "speedup_measured", "speedup_ideal")
_MEASURED_KNOWN_EXTRAS = {
    "simulated_accuracy": "simulated accuracy, same rows %",
    "overhead_heads": "exit-head overhead %",
    "matches_simulation": "rows exiting as simulated %",
    "seconds_plain": "full model (s)",
    "seconds_all_heads": "all exits computed (s)",
    "seconds_early_exit": "early exit (s)",
    "num_examples": "examples",
    "rounds": "rounds",
    "load_average": "machine load (1 min)",
}
#: keys shown in another form (the ratio and spread columns, the warning notes) or not worth a column
_MEASURED_HIDDEN = {"ratio_to_ideal", "exit_layers", "speedup_spread", "overhead_spread", "warnings",
                    "simulated_avg_layers"}


def write_report(results: Mapping[str, Any], folder: str | Path, tolerance: float | None = None) -> Path:
    """Write ``report.md``, ``tradeoff.png`` and ``per_layer_accuracy.png`` into ``folder``; return the
    report's path.

    ``tolerance`` (a fraction; default ``results["tolerance"]`` if present, else 0.01) picks each rule's
    operating point: the most layers saved with accuracy >= full − tolerance. The figures are linked with
    relative paths, so the folder can be moved as a whole. With a ``controllability`` entry the report also
    has an accuracy-control section (its figures, ``controllability.png`` and ``budgets.png``, are drawn by
    ``layerexit.evaluation.control``).
    """
    from .plots import plot_per_layer, plot_tradeoff  # imported here: plots pulls in matplotlib

    tolerance = effective_tolerance(results, tolerance)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(results, folder / "tradeoff.png", tolerance=tolerance)
    plot_per_layer(results, folder / "per_layer_accuracy.png")
    parts = [
        *_intro(results, tolerance),
        *_per_layer_section(results),
        *_oracle_section(results),
        *_simulated_section(results, tolerance),
        *_measured_section(results),
        *_control_section(results.get("controllability")),
    ]
    path = folder / "report.md"
    write_text_atomic(path, "\n\n".join(parts) + "\n")
    return path


def _intro(results: Mapping[str, Any], tolerance: float) -> list[str]:
    full_accuracy = float(results["full"]["accuracy"])
    return [
        f"# Early-exit report: {results.get('model', 'model')} on {results.get('dataset', 'dataset')} "
        f"({results.get('split', '?')}, {results.get('num_examples', '?')} examples)",
        "**What is simulated and what is measured.** The per-layer accuracies, the oracles and the "
        "\"Simulated over cached logits\" table are *simulated*: every exit was run once over the split, its "
        "logits were cached, and each rule was replayed over the cache; their \"saved layers\" count layers, "
        "not time. Only the \"Measured (real layer skipping, wall clock)\" table is *measured*: the model "
        "really skipped layers and both the full model and the early-exit model were timed in the same run. "
        "Both figures (`tradeoff.png`, `per_layer_accuracy.png`) come from the cached logits.",
        "## Full model",
        f"- Accuracy: **{pct(full_accuracy)}%** with all {num_layers(results)} layers.\n"
        f"- Tolerance for operating points: {100 * tolerance:.1f} accuracy points "
        f"(floor {pct(full_accuracy - tolerance)}%).",
    ]


def _per_layer_section(results: Mapping[str, Any]) -> list[str]:
    per_layer = results.get("per_layer_accuracy") or []
    full_accuracy = float(results["full"]["accuracy"])
    total = num_layers(results)
    parts = ["## Per-layer accuracy (each exit alone)"]
    if per_layer:
        rows = [[i + 1, pct(acc), f"{100 * (float(acc) - full_accuracy):+.1f}",
                 pct(1 - (i + 1) / total) if total else "n/a"] for i, acc in enumerate(per_layer)]
        parts.append(md_table(["exit layer", "accuracy %", "vs full (pt)", "saved layers %"], rows))
    else:
        parts.append("_No per-layer accuracies in these results._")
    parts.append("![Per-layer accuracy](per_layer_accuracy.png)")
    return parts


def _oracle_section(results: Mapping[str, Any]) -> list[str]:
    parts = ["## Oracles (simulated bounds, not deployable rules)"]
    oracles = results.get("oracles") or {}
    if oracles:
        rows = [[name, pct(p.get("accuracy")), num(p.get("avg_layers")), pct(p.get("saved_layers")),
                 _ORACLE_NOTES.get(name, "")] for name, p in oracles.items()]
        parts.append(md_table(["oracle", "accuracy %", "avg layers", "saved layers %", "exits at"], rows))
    else:
        parts.append("_No oracles in these results._")
    return parts


def _simulated_section(results: Mapping[str, Any], tolerance: float) -> list[str]:
    parts = ["## Simulated over cached logits"]
    curves = results.get("curves") or {}
    points = operating_points(results, tolerance)
    if not points:
        return [*parts, "_No simulated curves in these results._",
                "![Accuracy versus saved layers (simulated)](tradeoff.png)"]
    rows = []
    for rule, point in points.items():
        curve = curves.get(rule) or []
        auc = num(area_under_curve(curve), 3) if len(curve) else "n/a"
        front = pareto_front(curve)
        span = f"{pct(front[0]['saved_layers'])}–{pct(front[-1]['saved_layers'])}" if front else "n/a"
        if point is None:
            rows.append([rule, f"none within {100 * tolerance:.1f} pt", "n/a", "n/a", "n/a", auc, span, len(curve)])
        else:
            rows.append([rule, format_params(point.get("params")), pct(point.get("accuracy")),
                         num(point.get("avg_layers")), pct(point.get("saved_layers")), auc, span, len(curve)])
    parts.append(
        f"Operating point: the point of each rule's sweep that saves the most layers with accuracy within "
        f"{100 * tolerance:.1f} pt of the full model. Area: the integral over saved layers s in [0, 1] of the "
        f"best accuracy among the sweep's points that save at least s (0 where none does); the same axis for "
        f"every rule, so areas compare directly (see `area_under_curve`)."
    )
    parts.append(md_table(["rule", "operating point params", "accuracy %", "avg layers", "saved layers %", "area",
                           "front spans saved %", "points"], rows))
    parts.append("![Accuracy versus saved layers (simulated)](tradeoff.png)")
    return parts


def _measured_section(results: Mapping[str, Any]) -> list[str]:
    return [
        "## Measured (real layer skipping, wall clock)",
        "Speed-up = full-model time / early-exit time, both measured in the same process and run, interleaved "
        "round by round (median over rounds; the spread column gives the lowest and highest per-round "
        "speed-up). The ideal speed-up L / avg layers assumes layers are all the cost and exits are free; "
        "measured / ideal shows how much of it the implementation realises, and a measured speed-up above "
        "the ideal is flagged: it means the timing was disturbed, not that early exit beat arithmetic.",
        measured_table(results.get("measured") or [], num_layers(results)),
    ]


def measured_table(measured: list[Mapping[str, Any]], total_layers: int) -> str:
    """The Markdown table of measured runs with its notes (spread, warnings, rows differing from simulation)."""
    if not measured:
        return "_No measured runs in these results._"
    extras_known = [k for k in _MEASURED_KNOWN_EXTRAS if any(k in m for m in measured)]
    extras_other: list[str] = []
    for entry in measured:
        for key, value in entry.items():
            if key in _MEASURED_CORE or key in _MEASURED_KNOWN_EXTRAS or key in _MEASURED_HIDDEN or key in extras_other:
                continue
            if value is None or isinstance(value, (bool, int, float, str, Mapping)):
                extras_other.append(key)
    spread = any("speedup_spread" in m for m in measured)
    header = ["rule", "params", "batch size", "accuracy %", "avg layers", "saved layers %",
              "measured speed-up", *(["spread (min–max)"] if spread else []), "ideal speed-up (L/avg)",
              "measured / ideal"]
    header += [_MEASURED_KNOWN_EXTRAS[k] for k in extras_known] + extras_other
    rows = [_measured_row(m, total_layers, spread, extras_known, extras_other) for m in measured]
    notes = [
        "Exit-head overhead: time with every exit computed (the engine with the `full` rule) over the plain model "
        "(backbone + last exit), minus one. Rows exiting as simulated: the share of rows whose measured exit layer "
        "equals the simulation's on the cached logits (float32 batches of other shapes can move a row that sits "
        "on a threshold). Simulated accuracy, same rows: the simulation over exactly the rows that were timed."
    ]
    if any(m.get("matches_simulation") is False or (isinstance(m.get("matches_simulation"), float)
                                                     and m["matches_simulation"] < 1.0) for m in measured):
        notes.append(
            "**Note:** in at least one measured run some rows did not exit at the same layer as in the "
            "simulation; its accuracy and average layers may differ slightly from the simulated table."
        )
    warnings = timing_warnings_note([(f"{m.get('rule', '?')} at batch {m.get('batch_size', '?')}", w)
                                     for m in measured for w in m.get("warnings") or []])
    if warnings:
        notes.append(warnings)
    return "\n\n".join([md_table(header, rows), *notes])


def timing_warnings_note(warnings: list[tuple[str, str]]) -> str:
    """The report's note on implausible timings, one line per ``(what was timed, warning)``; empty if none."""
    if not warnings:
        return ""
    return ("**Timing warnings** (re-run these on a quiet machine before quoting them):\n"
            + "\n".join(f"- {what}: {warning}" for what, warning in warnings))


def _measured_row(m: Mapping[str, Any], total_layers: int, spread: bool, extras_known: list[str],
                  extras_other: list[str]) -> list[Any]:
    avg = m.get("avg_layers")
    saved = 1.0 - float(avg) / total_layers if avg is not None and total_layers else None
    measured_su, ideal_su = m.get("speedup_measured"), m.get("speedup_ideal")
    try:
        ratio = num(float(measured_su) / float(ideal_su))
    except (TypeError, ValueError, ZeroDivisionError):
        ratio = "n/a"
    row = [m.get("rule", "?"), format_params(m.get("params")), m.get("batch_size", "n/a"), pct(m.get("accuracy")),
           num(avg), pct(saved), f"{num(measured_su)}x" if measured_su is not None else "n/a"]
    if spread:
        s = m.get("speedup_spread")
        row.append(f"{num(s['min'])}–{num(s['max'])}x" if s else "n/a")
    row += [f"{num(ideal_su)}x" if ideal_su is not None else "n/a", ratio]
    for key in extras_known:
        value = m.get(key)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key.startswith("seconds_") and numeric:
            row.append(f"{value:.3f}")
        elif key == "overhead_heads" and numeric:
            row.append(f"{100 * value:+.1f}")
        elif key in ("matches_simulation", "simulated_accuracy") and numeric:
            row.append(pct(value))
        else:
            row.append(scalar(value))
    return row + [scalar(m.get(k)) for k in extras_other]


def _control_section(report: Mapping[str, Any] | None) -> list[str]:
    if not report:
        return []
    parts = [
        "## Accuracy control and budgets (rules fitted on another split)",
        f"Rules fitted on **{report.get('fit_split')}** ({report.get('num_fit_examples', '?')} examples), "
        f"evaluated on **{report.get('eval_split')}** ({report.get('num_eval_examples', '?')} examples), "
        "simulated over cached logits. A target is achievable when it lies between the accuracy of exit 1 and "
        "of the last exit on the evaluation split.",
    ]
    summary = report["target_accuracy"]["summary"]
    rows = [[name, f"{100 * s['mean_abs_gap']:.2f}" if s["mean_abs_gap"] is not None else "n/a",
             f"{100 * s['max_abs_gap']:.2f}" if s["max_abs_gap"] is not None else "n/a",
             s["below_target"], s["below_target_by_more_than_1pt"], s["num_targets"]] for name, s in summary.items()]
    parts.append(md_table(["rule", "mean |target − achieved| (pt)", "max (pt)", "targets missed",
                           "missed by > 1 pt", "achievable targets"], rows))
    asked = report.get("asked_target") or {}
    if asked:
        target = next(iter(asked.values()))["target"]
        parts.append(f"At the asked target {pct(target)}%:")
        parts.append(md_table(["rule", "accuracy %", "gap (pt)", "avg layers", "saved layers %"],
                              [[name, pct(r["accuracy"]), f"{100 * r['gap']:+.1f}", num(r["avg_layers"]),
                                pct(r["saved_layers"])] for name, r in asked.items()]))
    parts.append("![Target versus achieved accuracy](controllability.png)")
    budget_rows = []
    for unit, sweep in (report.get("budgets") or {}).items():
        for r in sweep["rows"]:
            if "cost" in r:
                budget_rows.append([unit, pct(r["asked"]), pct(r["fit_cost"]), pct(r["cost"]),
                                    f"{100 * r['relative_error']:+.1f}", pct(r["accuracy"])])
            else:
                budget_rows.append([unit, pct(r["asked"]), "n/a", "n/a", "n/a", r["error"]])
    if budget_rows:
        parts.append("Budget rule: the threshold fitted on the fitting split so that the average cost there meets "
                     "the budget, then the cost it reaches on the evaluation split.")
        parts.append(md_table(["cost unit", "budget %", "cost on fitting split %", "cost achieved %",
                               "relative error %", "accuracy %"], budget_rows))
        parts.append("![Budget asked versus achieved](budgets.png)")
    if report.get("measured"):
        parts.append("Measured at the asked target (real layer skipping, wall clock):")
        parts.append(measured_table(report["measured"], len(report.get("fit_per_layer_accuracy") or [])))
    return parts


__all__ = ["measured_table", "timing_warnings_note", "write_report"]

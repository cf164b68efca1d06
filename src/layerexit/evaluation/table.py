"""Plain-text summaries of a results dict for the terminal: the operating-point table, the accuracy-control
lines, and the timing warnings. Everything is returned as a string; printing is the caller's choice."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .formatting import num, pct, point_cells
from .metrics import effective_tolerance, num_layers, operating_points


def format_table(results: Mapping[str, Any], tolerance: float | None = None) -> str:
    """Plain-text table for the terminal: the full model, each rule's operating point, each oracle.

    Columns: rule, params, accuracy %, avg layers, saved %. The first data row (third line, after the header
    and a rule of dashes) is ``full``. ``tolerance`` defaults to ``results["tolerance"]`` or 0.01. Every row
    except ``full`` is simulated from cached logits.
    """
    tolerance = effective_tolerance(results, tolerance)
    rows = [["full", "-", pct(results["full"]["accuracy"]), num(num_layers(results)), pct(0.0)]]
    for rule, point in operating_points(results, tolerance).items():
        if point is None:
            rows.append([rule, f"no point within {100 * tolerance:.1f} pt", "n/a", "n/a", "n/a"])
        else:
            rows.append(point_cells(rule, point))
    for name, point in (results.get("oracles") or {}).items():
        rows.append(point_cells(f"oracle:{name}", point))

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


def format_summary(results: Mapping[str, Any], tolerance: float | None = None) -> str:
    """What the terminal shows after an evaluation: the operating-point table, the accuracy-control lines
    when there are any, and any timing warnings."""
    parts = [format_table(results, tolerance)]
    if results.get("controllability"):
        parts.append(format_control(results["controllability"]))
    warnings = format_warnings(results)
    if warnings:
        parts.append(warnings)
    return "\n\n".join(parts)


def format_control(report: Mapping[str, Any]) -> str:
    """The accuracy-control summary of a ``results["controllability"]`` entry, a few lines."""
    lines = [f"accuracy control (rules fitted on {report['fit_split']}, evaluated on {report['eval_split']}; "
             "simulated over cached logits):"]
    for name, s in report["target_accuracy"]["summary"].items():
        gap = "n/a" if s["mean_abs_gap"] is None else f"{100 * s['mean_abs_gap']:.2f} pt"
        lines.append(f"  {name:>11}: mean |target - achieved| {gap} over {s['num_targets']} achievable targets")
    for name, row in (report.get("asked_target") or {}).items():
        lines.append(f"  target {100 * row['target']:.1f}%: {name:>11} reaches {100 * row['accuracy']:.1f}% "
                     f"with {row['avg_layers']:.2f} layers")
    for unit, row in (report.get("asked_budget") or {}).items():
        if "cost" in row:
            lines.append(f"  budget {100 * row['asked']:.0f}% of the {unit}: reached {100 * row['cost']:.1f}% "
                         f"(accuracy {100 * row['accuracy']:.1f}%)")
        else:
            lines.append(f"  budget {100 * row['asked']:.0f}% of the {unit}: {row['error']}")
    return "\n".join(lines)


def format_warnings(results: Mapping[str, Any]) -> str:
    """One line per timing warning in ``results["measured"]`` (and the control's measured runs); '' if none."""
    entries = list(results.get("measured") or []) + list((results.get("controllability") or {}).get("measured")
                                                         or [])
    lines = [f"WARNING ({e.get('rule')}, batch {e.get('batch_size')}): {w}" for e in entries
             for w in e.get("warnings") or []]
    return "\n".join(lines)




def format_measured(entry: Mapping[str, Any], total_layers: int) -> str:
    """One measured entry as a line (and its warnings, one line each)."""
    su = entry.get("speedup_spread")
    spread = f" [rounds {su['min']:.2f}-{su['max']:.2f}x]" if su else ""
    lines = [f"batch {entry['batch_size']:>3}: {entry['rule']} {entry['params']} accuracy "
             f"{100 * entry['accuracy']:.1f}% avg layers {entry['avg_layers']:.2f}/{total_layers}  speed-up measured "
             f"{entry['speedup_measured']:.2f}x{spread} ideal {entry['speedup_ideal']:.2f}x (ratio "
             f"{entry['ratio_to_ideal']:.2f}); exit heads add {100 * entry['overhead_heads']:.1f}% to the full path"]
    lines += [f"  WARNING: {w}" for w in entry.get("warnings") or []]
    return "\n".join(lines)


def format_calibration(table: list[Mapping[str, Any]], budget=None, split: str = "") -> str:
    """Per exit: accuracy, confidence, ECE before and after temperature scaling; and the fitted budget rule."""
    lines = [f"{'exit':>4} {'accuracy %':>10} {'confidence %':>12} {'ECE %':>6} {'T':>6} {'ECE after T %':>13}"]
    for row in table:
        lines.append(f"{row['exit']:>4} {100 * row['accuracy']:>10.1f} {100 * row['mean_confidence']:>12.1f} "
                     f"{100 * row['ece']:>6.2f} {row['temperature']:>6.2f} {100 * row['ece_scaled']:>13.2f}")
    if budget is not None:
        lines.append(f"budget {budget.budget:.2f} ({budget.cost}): threshold {budget.threshold_:.4f}, cost on {split} "
                     f"{budget.fit_cost_:.4f}, {budget.fit_avg_layers_:.2f} layers")
    return "\n".join(lines)


__all__ = ["format_calibration", "format_control", "format_measured", "format_summary", "format_table",
           "format_warnings"]

"""Numbers derived from a results dict: operating points, Pareto fronts, areas under the trade-off curve.

A curve is a list of POINTs ``{"params", "accuracy", "avg_layers", "saved_layers"}`` with fractions in [0, 1].
Nothing here formats, prints or draws; the report, the terminal table and the figures all read these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..catalog import DEFAULT_TOLERANCE  # one accuracy point
from ..errors import bad_value

# Slack for comparing accuracies against ``full − tolerance``: 0.8 − 0.1 is 0.7000000000000001 in floating
# point, and an accuracy of exactly 70/100 must still count as within ten points of 80/100.
_EPS = 1e-9


def check_tolerance(tolerance: float) -> float:
    """``tolerance`` as a float, or a clear error when it is not a finite fraction >= 0."""
    value = float(tolerance)
    if not math.isfinite(value) or value < 0:
        raise bad_value("tolerance", tolerance, "give a finite fraction >= 0 (e.g. 0.01 for one accuracy point)")
    return value


def effective_tolerance(results: Mapping[str, Any], tolerance: float | None = None) -> float:
    """Explicit argument first, then ``results["tolerance"]``, then ``DEFAULT_TOLERANCE``."""
    if tolerance is None:
        tolerance = results.get("tolerance", DEFAULT_TOLERANCE)
    return check_tolerance(tolerance)


def num_layers(results: Mapping[str, Any]) -> int:
    """The model's number of layers: ``results["num_layers"]``, else the length of the per-layer accuracies."""
    if results.get("num_layers"):
        return int(results["num_layers"])
    return len(results.get("per_layer_accuracy") or [])


def operating_point(
    curve: Sequence[Mapping[str, Any]], full_accuracy: float, tolerance: float = DEFAULT_TOLERANCE
) -> dict | None:
    """The point of ``curve`` that saves the most layers while staying within ``tolerance`` of the full model.

    Candidates are the points with ``accuracy >= full_accuracy - tolerance`` (compared with a 1e-9 slack for
    floating-point rounding). Among them the largest ``saved_layers`` wins; ties go to the higher accuracy,
    then to the earlier point in ``curve``. Returns the chosen point itself (not a copy), or ``None`` when no
    point qualifies (including an empty curve). ``tolerance`` is a fraction (0.01 = one accuracy point).
    """
    tolerance = check_tolerance(tolerance)
    floor = float(full_accuracy) - tolerance - _EPS
    best = None
    for point in curve:
        if float(point["accuracy"]) < floor:
            continue
        key = (float(point["saved_layers"]), float(point["accuracy"]))
        if best is None or key > best[0]:  # strict: the earlier point keeps a full tie
            best = (key, point)
    return None if best is None else best[1]


def operating_points(results: Mapping[str, Any], tolerance: float | None = None) -> dict[str, dict | None]:
    """Operating point of every rule: recomputed from its curve with ``tolerance`` so that the report, the
    table and the figure agree on the tolerance they print. A rule present only in
    ``results["operating_points"]`` (no curve) keeps the stored point."""
    tolerance = effective_tolerance(results, tolerance)
    full = float(results["full"]["accuracy"])
    points: dict[str, dict | None] = {
        rule: operating_point(curve, full, tolerance) for rule, curve in (results.get("curves") or {}).items()
    }
    for rule, point in (results.get("operating_points") or {}).items():
        points.setdefault(rule, point)
    return points


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


__all__ = ["DEFAULT_TOLERANCE", "area_under_curve", "check_tolerance", "effective_tolerance", "num_layers",
           "operating_point", "operating_points", "pareto_front"]

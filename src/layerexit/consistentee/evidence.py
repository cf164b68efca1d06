"""Evidence across seeds and for the alpha dial: summaries, differences claimed only beyond the seeds'
spread, the dial's coverage of saved layers, and how far one dial model is from separately trained runs.

A curve is a list of results.json POINTs (``accuracy``, ``saved_layers``, ``params``).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..evaluation.metrics import pareto_front


def summarize(values: Sequence[float]) -> dict:
    """Per-seed values -> {"values", "mean", "std"} (sample standard deviation, 0 for one seed)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values) if values else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"values": values, "mean": mean, "std": std}


def compare(a: Sequence[float], b: Sequence[float]) -> dict:
    """Is ``a`` above or below ``b`` beyond the seeds' spread?

    ``a`` and ``b`` hold one value per seed (same seeds, same order). The difference of the means counts only
    when it exceeds the sum of the two standard deviations and every seed's paired difference has its sign;
    ``verdict`` is then "higher" or "lower", else "within spread". A single seed is never beyond spread.
    """
    sa, sb = summarize(a), summarize(b)
    paired = [x - y for x, y in zip(sa["values"], sb["values"])]
    diff = sa["mean"] - sb["mean"]
    spread = sa["std"] + sb["std"]
    consistent = all(p > 0 for p in paired) or all(p < 0 for p in paired)
    beyond = len(paired) > 1 and consistent and abs(diff) > spread
    return {"difference": diff, "spread": spread, "paired_differences": paired,
            "verdict": ("higher" if diff > 0 else "lower") if beyond else "within spread"}


def best_accuracy_at(curve: Sequence[Mapping], saved: float) -> float | None:
    """The highest accuracy among the points of ``curve`` saving at least ``saved`` (None if none does)."""
    reach = [float(p["accuracy"]) for p in curve if float(p["saved_layers"]) >= saved - 1e-12]
    return max(reach) if reach else None


def dial_versus_runs(dial: Sequence[Mapping], runs: Sequence[Mapping], tolerance: float = 0.005) -> dict:
    """For each separately trained run's point, how many accuracy points the dial's curve is below it at that
    saved-layers level (negative: the dial is better); ``within`` if every shortfall is <= ``tolerance``."""
    rows = []
    for point in runs:
        best = best_accuracy_at(dial, float(point["saved_layers"]))
        shortfall = float(point["accuracy"]) - best if best is not None else None
        rows.append({"params": point.get("params", {}), "saved_layers": float(point["saved_layers"]),
                     "accuracy": float(point["accuracy"]), "dial_accuracy": best, "shortfall": shortfall})
    within = all(r["shortfall"] is not None and r["shortfall"] <= tolerance + 1e-12 for r in rows)
    return {"points": rows, "tolerance": tolerance, "within": within}


def dial_coverage(curve: Sequence[Mapping], low: float = 0.2, high: float = 0.7, max_gap: float = 0.1) -> dict:
    """Does the dial reach saved layers from ``low`` to ``high`` with no gap wider than ``max_gap``?

    Gaps are measured between consecutive saved-layers levels of the curve's points, over [low, high] (the
    ends count as gaps from the nearest point).
    """
    saved = sorted({float(p["saved_layers"]) for p in curve})
    if not saved:
        return {"min_saved": None, "max_saved": None, "largest_gap": None, "covers": False}
    inside = [low] + [s for s in saved if low < s < high] + [high]
    # a point below low / above high closes the end; otherwise the end itself is a gap from the nearest point
    start = low if saved[0] <= low else saved[0]
    end = high if saved[-1] >= high else saved[-1]
    levels = sorted({start, end, *[s for s in inside if start <= s <= end]})
    largest = max([b - a for a, b in zip(levels, levels[1:])] + [start - low, high - end])
    return {"min_saved": saved[0], "max_saved": saved[-1], "largest_gap": largest,
            "covers": saved[0] <= low + 1e-12 and saved[-1] >= high - 1e-12 and largest <= max_gap + 1e-12,
            "pareto_points": len(pareto_front(curve))}

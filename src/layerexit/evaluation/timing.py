"""Whether a measured speed-up can be trusted: its spread over rounds and the plausibility checks.

Early exit cannot beat arithmetic: a rule that runs ``avg_layers`` of ``L`` layers saves at most the
layers it skips, so the measured speed-up over the plain model can exceed the ideal ``L / avg_layers`` only
by noise (the exit heads and the rule cost time on top). Likewise computing every exit head costs more than
computing one, so the head overhead cannot be negative beyond noise. A figure outside these bounds says the
machine was disturbed while it was measured (another job, frequency changes), not that the code is fast;
such figures are flagged in results.json (``warnings``), the report and the terminal.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

#: a measured speed-up more than this fraction above the ideal is flagged
IDEAL_MARGIN = 0.10
#: the smallest noise band assumed for the head overhead (a fraction of the plain model's time)
OVERHEAD_NOISE_FLOOR = 0.02
#: per-round speed-ups whose highest is more than this factor above the lowest are flagged as unsteady
UNSTEADY_FACTOR = 1.25
#: fewer rounds than this give no spread worth the name
MIN_ROUNDS = 3


def spread(values: Sequence[float]) -> dict[str, float]:
    """min, first quartile, median, third quartile and max of ``values`` (quartiles interpolated; with one
    value all five are that value)."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("spread() needs at least one value")
    if len(ordered) == 1:
        q1 = q3 = ordered[0]
    else:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"min": ordered[0], "q1": q1, "median": statistics.median(ordered), "q3": q3, "max": ordered[-1]}


def paired_speedup(reference: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """Per-round speed-up of ``other`` over ``reference`` (seconds of the same rounds; > 1: ``other`` is
    faster): median, min and max over rounds. On a noisy machine both variants of one round share its
    disturbance, so the ratio within a round varies less than the ratio of two medians taken over rounds."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"paired_speedup() needs the same rounds for both: got {len(reference)} and {len(other)}")
    ratios = [float(r) / float(o) for r, o in zip(reference, other)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def timing_warnings(entry: dict) -> list[str]:
    """Plain-language warnings for one measured entry (``speed_report``'s keys); empty when it looks sound."""
    warnings = []
    measured, ideal = entry.get("speedup_measured"), entry.get("speedup_ideal")
    if measured is not None and ideal and measured > ideal * (1.0 + IDEAL_MARGIN):
        warnings.append(f"measured speed-up {measured:.2f}x is above the ideal L/avg_layers {ideal:.2f}x by "
                        f"{100 * (measured / ideal - 1):.0f}% (more than {100 * IDEAL_MARGIN:.0f}%): the timing was "
                        "disturbed; re-run on a quiet machine")
    overhead = entry.get("overhead_heads")
    if overhead is not None:
        band = entry.get("overhead_spread")
        noise = max(OVERHEAD_NOISE_FLOOR, band["q3"] - band["q1"]) if band else OVERHEAD_NOISE_FLOOR
        if overhead < -noise:
            warnings.append(f"exit-head overhead {100 * overhead:+.1f}% is negative beyond noise "
                            f"(±{100 * noise:.1f}%): computing every exit cannot be faster than computing one; "
                            "the timing was disturbed")
    rounds = entry.get("rounds")
    if isinstance(rounds, int) and rounds < MIN_ROUNDS:
        warnings.append(f"only {rounds} timing round(s): no spread; use at least {MIN_ROUNDS}")
    su = entry.get("speedup_spread")
    if su and su["min"] > 0 and su["max"] / su["min"] > UNSTEADY_FACTOR:
        warnings.append(f"per-round speed-ups range from {su['min']:.2f}x to {su['max']:.2f}x: the machine was busy; "
                        "compare medians only with care")
    return warnings


__all__ = ["IDEAL_MARGIN", "MIN_ROUNDS", "OVERHEAD_NOISE_FLOOR", "UNSTEADY_FACTOR", "spread", "timing_warnings"]

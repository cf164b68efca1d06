"""Figures of a ``results.json`` dict: the accuracy / saved-layers trade-off and the per-layer accuracy.

Both functions write a PNG (8 x 5 inches, 120 dpi), close the figure and return the path written. The
trade-off curves and oracles are simulated over cached logits and the figure says so; measured wall-clock
runs are not drawn here (they are tabulated in the report), so nothing on the figure is called a speed-up.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display needed, set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402

from .metrics import DEFAULT_TOLERANCE, operating_point  # noqa: E402

FIGSIZE = (8, 5)
DPI = 120

_ORACLE_STYLE = {
    "gold": {"color": "goldenrod", "label": "gold oracle (bound)"},
    "agreement": {"color": "black", "label": "agreement oracle (bound)"},
}
_RULE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def prepare_path(path: str | Path) -> Path:
    """``path`` as a Path whose folder exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` at the report resolution and close it (also on error); return ``path``."""
    try:
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def plot_tradeoff(
    results: Mapping[str, Any],
    path: str | Path,
    title: str | None = None,
    *,
    tolerance: float | None = None,
) -> Path:
    """Accuracy (%) versus saved layers (%) of every simulated rule, the oracles, and the full model.

    Each rule of ``results["curves"]`` is a line with markers through its points sorted by saved layers
    (all points, not only the Pareto front); its operating point (most layers saved within ``tolerance``
    of full) is circled. The oracles are stars labelled as bounds. A dashed line marks the full model's
    accuracy and a dotted one ``full − tolerance``; ``tolerance`` defaults to ``results["tolerance"]``
    or 0.01. Returns ``path``.
    """
    path = prepare_path(path)
    if tolerance is None:
        tolerance = float(results.get("tolerance", DEFAULT_TOLERANCE))
    full = 100.0 * float(results["full"]["accuracy"])

    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    colors = plt.get_cmap("tab10" if len(results.get("curves") or {}) <= 10 else "tab20").colors
    styles = zip(itertools.cycle(colors), itertools.cycle(_RULE_MARKERS))
    circled = False
    saved_seen: list[float] = []  # every x drawn, to fit the axis
    for (rule, curve), (color, marker) in zip((results.get("curves") or {}).items(), styles):
        if not curve:
            continue
        points = sorted(curve, key=lambda p: (float(p["saved_layers"]), float(p["accuracy"])))
        xs = [100.0 * float(p["saved_layers"]) for p in points]
        ys = [100.0 * float(p["accuracy"]) for p in points]
        saved_seen += xs
        ax.plot(xs, ys, marker=marker, markersize=4, linewidth=1.3, color=color, label=rule)
        chosen = operating_point(curve, full / 100.0, tolerance)
        if chosen is not None:
            ax.plot(
                100.0 * float(chosen["saved_layers"]), 100.0 * float(chosen["accuracy"]), marker="o",
                markersize=11, markerfacecolor="none", markeredgecolor=color, markeredgewidth=1.5,
                linestyle="none",
            )
            circled = True
    if circled:  # one neutral legend entry for all the circles
        ax.plot([], [], marker="o", markersize=11, markerfacecolor="none", markeredgecolor="dimgray",
                linestyle="none", label=f"operating point (≤{100.0 * tolerance:.1f} pt loss)")

    for name, point in (results.get("oracles") or {}).items():
        style = _ORACLE_STYLE.get(name, {"color": "gray", "label": f"{name} oracle (bound)"})
        saved_seen.append(100.0 * float(point["saved_layers"]))
        ax.plot(
            100.0 * float(point["saved_layers"]), 100.0 * float(point["accuracy"]), marker="*", markersize=16,
            markeredgecolor="white", markeredgewidth=0.8, linestyle="none", zorder=5, **style,
        )

    ax.axhline(full, color="dimgray", linestyle="--", linewidth=1.0, label=f"full model ({full:.1f}%)")
    ax.axhline(
        full - 100.0 * tolerance, color="dimgray", linestyle=":", linewidth=1.2,
        label=f"full − {100.0 * tolerance:.1f} pt ({full - 100.0 * tolerance:.1f}%)",
    )
    ax.set_xlabel("saved layers, % (simulated over cached logits)")
    ax.set_ylabel("accuracy, %")
    right = max(saved_seen, default=100.0)
    ax.set_xlim(-2.0, min(102.0, right + 8.0))  # the saved-layers axis always starts at 0 (no skipping)
    default_title = (
        f"{results.get('model', 'model')} on {results.get('dataset', 'dataset')} ({results.get('split', '?')})\n"
        "accuracy vs saved layers (simulated)"
    )
    ax.set_title(title or default_title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return save_figure(fig, path)


def plot_per_layer(results: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart of each exit's accuracy (%) by exit layer 1..L, with the full model's accuracy as a dashed
    line. Returns ``path``."""
    path = prepare_path(path)
    accuracies = [100.0 * float(a) for a in results.get("per_layer_accuracy") or []]
    full = 100.0 * float(results["full"]["accuracy"])
    layers = list(range(1, len(accuracies) + 1))

    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    bars = ax.bar(layers, accuracies, color="tab:blue", alpha=0.8, label="exit at layer l (alone)")
    if len(accuracies) <= 24:
        # inside the bars, so the full-model line never runs through them
        ax.bar_label(bars, labels=[f"{a:.1f}" for a in accuracies], label_type="center", fontsize=8, color="white")
    ax.axhline(full, color="dimgray", linestyle="--", linewidth=1.0, label=f"full model ({full:.1f}%)")
    ax.set_xticks(layers)
    ax.set_xlabel("exit layer")
    ax.set_ylabel("accuracy, %")
    top = max([full, *accuracies])
    ax.set_ylim(0, min(105.0, top + 8.0))  # bars start at 0: a truncated axis would exaggerate the gaps
    ax.set_title(
        f"{results.get('model', 'model')} on {results.get('dataset', 'dataset')} "
        f"({results.get('split', '?')}, {results.get('num_examples', '?')} examples)\naccuracy of each exit alone",
        fontsize=10,
    )
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return save_figure(fig, path)

"""Figures of a ``results.json`` dict: the accuracy / saved-layers trade-off and the per-layer accuracy; and of
a comparison of generation strategies: measured speed-up against agreement, and where early exit happens.

Every function writes a PNG (120 dpi; 8 x 5 inches for the classifier figures), closes the figure and returns
the path written. The
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

    Two panels: on the left every point of every rule, on the right the band near the full model where
    operating points live (from a few points below ``full − tolerance`` to the best rule), so that
    differences of a point or less are visible. The y-axes are fitted to the rules and the full model, not to
    the oracles: an oracle outside a panel is drawn as an arrow at its edge, labelled with its accuracy.
    Rules are told apart by colour, marker and line style; a rule whose points equal an earlier rule's says
    so in the legend and is drawn hollow and dashed over it. Each rule's operating point (most layers saved
    within ``tolerance`` of full) is circled; ``tolerance`` defaults to ``results["tolerance"]`` or 0.01.
    Returns ``path``.
    """
    path = prepare_path(path)
    if tolerance is None:
        tolerance = float(results.get("tolerance", DEFAULT_TOLERANCE))
    full = 100.0 * float(results["full"]["accuracy"])
    curves = [(rule, _sorted_xy(curve)) for rule, curve in (results.get("curves") or {}).items() if curve]
    ys = [y for _, (_, cys) in curves for y in cys]
    xs = [x for _, (cxs, _) in curves for x in cxs] + [100.0 * float(p["saved_layers"])
                                                         for p in (results.get("oracles") or {}).values()]
    floor = full - 100.0 * tolerance
    depth = max(3.0, 3 * 100.0 * tolerance)  # the zoomed panel reaches this far below the full model
    panels = {
        "every point": (min([*ys, floor]) - 1.5, max([*ys, full]) + 1.5),
        f"near the full model (down to {depth:.1f} pt below it)": (full - depth, max([*ys, full]) + 0.5),
    }
    fig, axes = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.6, FIGSIZE[1]), layout="constrained")
    for ax, (name, ylim) in zip(axes, panels.items()):
        _draw_curves(ax, results, curves, full, tolerance, legend=ax is axes[0])
        _draw_oracles(ax, results.get("oracles") or {}, ylim, legend=ax is axes[0])
        ax.axhline(full, color="dimgray", linestyle="--", linewidth=1.0,
                   label=f"full model ({full:.1f}%)" if ax is axes[0] else None)
        ax.axhline(floor, color="dimgray", linestyle=":", linewidth=1.2,
                   label=f"full − {100.0 * tolerance:.1f} pt ({floor:.1f}%)" if ax is axes[0] else None)
        ax.set_ylim(*ylim)
        ax.set_xlim(-2.0, min(102.0, max(xs, default=100.0) + 8.0))  # saved layers start at 0 (no skipping)
        ax.set_xlabel("saved layers, % (simulated over cached logits)")
        ax.set_ylabel("accuracy, %")
        ax.set_title(name, fontsize=9)
        ax.grid(True, alpha=0.3)
    default_title = (
        f"{results.get('model', 'model')} on {results.get('dataset', 'dataset')} ({results.get('split', '?')}): "
        "accuracy vs saved layers (simulated)"
    )
    fig.suptitle(title or default_title, fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return save_figure(fig, path)


_LINE_STYLES = ("-", "--", "-.", ":")


def _sorted_xy(curve) -> tuple[list[float], list[float]]:
    points = sorted(curve, key=lambda p: (float(p["saved_layers"]), float(p["accuracy"])))
    return [100.0 * float(p["saved_layers"]) for p in points], [100.0 * float(p["accuracy"]) for p in points]


def _draw_curves(ax, results, curves, full: float, tolerance: float, legend: bool) -> None:
    colors = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors
    styles = zip(itertools.cycle(colors), itertools.cycle(_RULE_MARKERS), itertools.cycle(_LINE_STYLES))
    seen: dict[tuple, str] = {}
    circled = False
    for (rule, (xs, ys)), (color, marker, line) in zip(curves, styles):
        key = (tuple(round(x, 6) for x in xs), tuple(round(y, 6) for y in ys))
        twin = seen.setdefault(key, rule)
        label = rule if twin == rule else f"{rule} (same points as {twin})"
        hollow = {"markerfacecolor": "none", "markersize": 8, "linewidth": 2.0, "linestyle": "--"} if twin != rule \
            else {"markersize": 4, "linewidth": 1.3, "linestyle": line}
        ax.plot(xs, ys, marker=marker, color=color, label=label if legend else None, **hollow)
        chosen = operating_point(results["curves"][rule], full / 100.0, tolerance)
        if chosen is not None:
            ax.plot(100.0 * float(chosen["saved_layers"]), 100.0 * float(chosen["accuracy"]), marker="o",
                    markersize=11, markerfacecolor="none", markeredgecolor=color, markeredgewidth=1.5,
                    linestyle="none")
            circled = True
    if circled and legend:  # one neutral legend entry for all the circles
        ax.plot([], [], marker="o", markersize=11, markerfacecolor="none", markeredgecolor="dimgray",
                linestyle="none", label=f"operating point (≤{100.0 * tolerance:.1f} pt loss)")


def _draw_oracles(ax, oracles: Mapping[str, Any], ylim: tuple[float, float], legend: bool) -> None:
    """Oracles as stars; one above or below the panel as an arrow at that edge with its accuracy written."""
    low, high = ylim
    for name, point in oracles.items():
        style = _ORACLE_STYLE.get(name, {"color": "gray", "label": f"{name} oracle (bound)"})
        x, y = 100.0 * float(point["saved_layers"]), 100.0 * float(point["accuracy"])
        if low <= y <= high:
            ax.plot(x, y, marker="*", markersize=16, markeredgecolor="white", markeredgewidth=0.8,
                    linestyle="none", zorder=5, color=style["color"])
            continue
        edge, marker, va = (high, "^", "top") if y > high else (low, "v", "bottom")
        span = high - low
        ax.plot(x, edge - 0.03 * span if y > high else edge + 0.03 * span, marker=marker, markersize=10,
                linestyle="none", zorder=5, color=style["color"])
        ax.annotate(f"{name} oracle {y:.1f}%", (x, edge - 0.07 * span if y > high else edge + 0.07 * span),
                    fontsize=7, ha="center", va=va, color=style["color"])
    if legend:  # one legend entry per oracle, whatever the panel drew
        for name in oracles:
            style = _ORACLE_STYLE.get(name, {"color": "gray", "label": f"{name} oracle (bound)"})
            ax.plot([], [], marker="*", markersize=12, linestyle="none", **style)


def plot_per_layer(results: Mapping[str, Any], path: str | Path) -> Path:
    """Each exit's accuracy (%) by exit layer 1..L as points joined by a line, with the full model's
    accuracy as a dashed line. The y-axis spans the accuracies (points, not bars, so a truncated axis
    exaggerates nothing); each point is labelled with its value. Returns ``path``."""
    path = prepare_path(path)
    accuracies = [100.0 * float(a) for a in results.get("per_layer_accuracy") or []]
    full = 100.0 * float(results["full"]["accuracy"])
    layers = list(range(1, len(accuracies) + 1))

    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    ax.plot(layers, accuracies, marker="o", color="tab:blue", linewidth=1.3, label="exit at layer l (alone)")
    if len(accuracies) <= 24:
        for layer, accuracy in zip(layers, accuracies):
            ax.annotate(f"{accuracy:.1f}", (layer, accuracy), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
    ax.axhline(full, color="dimgray", linestyle="--", linewidth=1.0, label=f"full model ({full:.1f}%)")
    ax.set_xticks(layers)
    ax.set_xlabel("exit layer")
    ax.set_ylabel("accuracy, % (axis fitted to the values)")
    values = [full, *accuracies]
    margin = max(1.0, 0.08 * (max(values) - min(values)))
    ax.set_ylim(min(values) - margin, min(100.5, max(values) + 2 * margin))
    ax.set_title(
        f"{results.get('model', 'model')} on {results.get('dataset', 'dataset')} "
        f"({results.get('split', '?')}, {results.get('num_examples', '?')} examples)\naccuracy of each exit alone",
        fontsize=10,
    )
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return save_figure(fig, path)


_STRATEGY_MARKERS = {"speculative": "s", "early-exit": "o", "hf": "^"}


def plot_strategies(payload: Mapping[str, Any], path: str | Path) -> Path:
    """Measured speed-up over the full model against token match with its greedy output, one numbered point per
    strategy of a generation comparison (``generation.evaluate.compare``). Returns ``path``."""
    path = prepare_path(path)
    fig, ax = plt.subplots(figsize=(11, 5))
    for i, entry in enumerate(payload["results"], start=1):
        marker = _STRATEGY_MARKERS.get(entry["spec"].get("strategy"), "x")
        ax.scatter(entry["token_match"], entry["speedup_measured"], marker=marker, label=f"{i}. {entry['name']}")
        ax.annotate(str(i), (entry["token_match"], entry["speedup_measured"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("token match with full greedy output")
    ax.set_ylabel("measured tokens/s ÷ full model (same run)")
    ax.set_title("Generation strategies (measured)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_exit_layers(payload: Mapping[str, Any], path: str | Path) -> Path:
    """The share of generated tokens that exited at each layer, one line per early-exit strategy (the entries
    with an ``exit_histogram``). Returns ``path``."""
    path = prepare_path(path)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for entry in (e for e in payload["results"] if "exit_histogram" in e):
        hist = entry["exit_histogram"]
        total = sum(hist.values())
        ax.plot([int(k) for k in hist], [v / total for v in hist.values()], marker="o", label=entry["name"])
    ax.set_xlabel("exit layer")
    ax.set_ylabel("share of generated tokens")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)

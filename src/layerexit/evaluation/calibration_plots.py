"""Figures for calibration and control: reliability diagrams per exit, target versus achieved accuracy,
budget asked versus cost achieved. Everything drawn is simulated over cached logits, and titles say so."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .plots import FIGSIZE, plt, prepare_path, save_figure

_RULE_STYLE = {
    "pcee": {"color": "tab:blue", "marker": "o"},
    "pcee-ws": {"color": "tab:green", "marker": "s"},
    "maxprob": {"color": "tab:red", "marker": "^"},
    "maxprob-ts": {"color": "tab:orange", "marker": "v"},
}


def _draw_reliability(ax, bins: Mapping[str, Any], title: str, scaled: Mapping[str, Any] | None = None) -> None:
    edges = bins["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    accuracy = [math.nan if a is None else a for a in bins["accuracy"]]
    ax.bar(centres, accuracy, width=widths, color="tab:blue", alpha=0.6, edgecolor="white", label="accuracy")
    confidence = [math.nan if c is None else c for c in bins["confidence"]]
    ax.plot(centres, confidence, "k_", markersize=10, label="mean confidence")
    if scaled is not None:
        scaled_acc = [math.nan if a is None else a for a in scaled["accuracy"]]
        ax.plot(centres, scaled_acc, "o", color="tab:orange", markersize=3, label="after temperature")
    ax.plot([0, 1], [0, 1], color="dimgray", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)


def plot_reliability(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """One reliability diagram per exit in a grid (rows from ``controllability.calibration_table``)."""
    path = prepare_path(path)
    n = len(rows)
    cols = min(4, n)
    lines = math.ceil(n / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(3.0 * cols, 2.6 * lines + 0.6), squeeze=False,
                             layout="constrained")
    for ax, row in zip(axes.flat, rows):
        label = f"exit {row['exit']}: acc {100 * row['accuracy']:.1f}%, ECE {100 * row['ece']:.1f}"
        if "ece_scaled" in row:
            label += f"\nT={row['temperature']:.2f}, ECE after {100 * row['ece_scaled']:.1f}"
        _draw_reliability(ax, row["bins"], label, row.get("bins_scaled"))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="upper left")
    fig.supxlabel("max-softmax confidence", fontsize=9)
    fig.supylabel("accuracy", fontsize=9)
    fig.suptitle(title or "reliability diagram per exit (cached logits)", fontsize=10)
    return save_figure(fig, path)


def plot_reliability_exit(row: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """The reliability diagram of one exit."""
    path = prepare_path(path)
    fig, ax = plt.subplots(figsize=(4.5, 4.0), layout="constrained")
    label = title or f"exit {row['exit']}: accuracy {100 * row['accuracy']:.1f}%, ECE {100 * row['ece']:.1f} pt"
    _draw_reliability(ax, row["bins"], label, row.get("bins_scaled"))
    ax.set_xlabel("max-softmax confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def plot_controllability(report: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Left: accuracy achieved on the evaluation split versus target δ; right: average layers versus δ."""
    path = prepare_path(path)
    sweep = report["target_accuracy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.4, FIGSIZE[1]), layout="constrained")
    targets = [100 * t for t in sweep["targets"]]
    for name, rows in sweep["rules"].items():
        style = _RULE_STYLE.get(name, {})
        gap = sweep["summary"][name]["mean_abs_gap"]
        label = f"{name} (mean |gap| {100 * gap:.2f} pt)" if gap is not None else name
        left.plot(targets, [100 * r["accuracy"] for r in rows], markersize=3, linewidth=1.2, label=label, **style)
        right.plot(targets, [r["avg_layers"] for r in rows], markersize=3, linewidth=1.2, label=name, **style)
    low, high = (100 * v for v in sweep["achievable_range"])
    left.plot(targets, targets, color="dimgray", linestyle="--", linewidth=0.8, label="achieved = target")
    for ax in (left, right):
        ax.axvspan(low, high, color="gray", alpha=0.1, label="achievable targets")
        ax.set_xlabel("target accuracy δ, %")
        ax.grid(True, alpha=0.3)
    left.set_ylabel(f"accuracy on {report.get('eval_split', 'test')}, %")
    right.set_ylabel("average exit layer")
    left.legend(fontsize=7)
    fig.suptitle(title or f"accuracy control: fitted on {report.get('fit_split')}, evaluated on "
                 f"{report.get('eval_split')} (simulated over cached logits)", fontsize=10)
    return save_figure(fig, path)


def plot_budgets(report: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Cost achieved on the evaluation split versus the budget asked, per cost unit."""
    path = prepare_path(path)
    fig, ax = plt.subplots(figsize=(5.5, 5.0), layout="constrained")
    for (unit, sweep), color in zip(report["budgets"].items(), ("tab:blue", "tab:purple")):
        rows = [r for r in sweep["rows"] if "cost" in r]
        ax.plot([100 * r["asked"] for r in rows], [100 * r["cost"] for r in rows], "o-", color=color,
                markersize=4, label=f"{unit} (evaluation split)")
        ax.plot([100 * r["asked"] for r in rows], [100 * r["fit_cost"] for r in rows], "x", color=color,
                markersize=5, label=f"{unit} (fitting split)")
    ax.plot([0, 100], [0, 100], color="dimgray", linestyle="--", linewidth=0.8, label="achieved = asked")
    ax.fill_between([0, 100], [0, 95], [0, 105], color="gray", alpha=0.12, label="within 5%")
    ax.set_xlabel("budget asked, % of the full model's cost")
    ax.set_ylabel("average cost achieved, %")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "budget rule: asked versus achieved (simulated)", fontsize=10)
    return save_figure(fig, path)


__all__ = ["plot_reliability", "plot_reliability_exit", "plot_controllability", "plot_budgets"]

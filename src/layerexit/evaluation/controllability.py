"""Controllability: does the accuracy (or cost) asked for on validation data come out on test data?

For a range of target accuracies δ, rules are fitted on a validation cache and simulated on a test cache:
PCEE and PCEE-WS (Mofakhami et al., 2024, arXiv 2412.19325), max-prob with threshold δ and temperature-scaled
max-prob with threshold δ (the confidence baselines that paper compares against). For a range of budgets, the
budget rule is fitted on validation data and its achieved test cost compared with the budget asked.

All figures here are *simulated* over cached logits (exact accuracies and exit layers; no time measured).
The "achievable" targets are those between the test accuracy of exit 1 and of the last exit: below the first,
every rule meets the target by exiting at layer 1 and the gap measures the model, not the rule; above the
last, no rule that ends at the last exit can reach it.
"""

from __future__ import annotations

from ..calibration import confidence_and_correct, reliability_bins
from ..errors import LayerExitError, bad_value
from ..rules import PCEE, PCEEWS, Budget, MaxProb, TemperatureMaxProb
from ..rules.fitting import check_held_out
from .cache import LogitCache
from .simulate import per_layer_accuracy, simulate

DEFAULT_TARGETS = [round(0.60 + 0.01 * i, 2) for i in range(40)]  # 0.60 .. 0.99
DEFAULT_BUDGETS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
TARGET_RULES = ("pcee", "pcee-ws", "maxprob", "maxprob-ts")


def fit_rules(fit: LogitCache, num_bins: int = 10, binning: str = "width", smoothing: str = "neighbour",
              target: float = 0.9) -> dict:
    """The target-accuracy rules fitted once on ``fit`` (their tables do not depend on the target)."""
    return {
        "pcee": PCEE(target, num_bins, binning).fit(fit),
        "pcee-ws": PCEEWS(target, num_bins, binning, smoothing).fit(fit),
        "maxprob": MaxProb(target),
        "maxprob-ts": TemperatureMaxProb(target).fit(fit),
    }


def at_target(rule, target: float):
    """``rule`` set to target accuracy ``target`` (a threshold of ``target`` for the confidence rules)."""
    if isinstance(rule, PCEE):
        return rule.with_target(target)
    if isinstance(rule, TemperatureMaxProb):
        return rule.with_threshold(target)
    return MaxProb(target)


def evaluate_fitted(rule, cache: LogitCache) -> dict:
    """Simulate a fitted ``rule`` on ``cache`` after checking it was fitted on another split: a POINT."""
    check_held_out(rule, cache)
    sim = simulate(rule, cache.logits)
    return {**sim.point(cache.labels, cache.num_layers, rule.params), "exit_layer": sim.exit_layer}


def target_sweep(fit: LogitCache, test: LogitCache, targets=None, num_bins: int = 10, binning: str = "width",
                 smoothing: str = "neighbour", rules: dict | None = None) -> dict:
    """Accuracy achieved on ``test`` by each target-accuracy rule for each target; summary of the gaps.

    ``rules`` are the rules of ``fit_rules`` when already fitted (they are fitted here otherwise)."""
    targets = list(DEFAULT_TARGETS if targets is None else targets)
    rules = fit_rules(fit, num_bins, binning, smoothing) if rules is None else rules
    test_acc = per_layer_accuracy(test.logits, test.labels)
    low, high = test_acc[0], test_acc[-1]
    rows: dict[str, list[dict]] = {name: [] for name in rules}
    for target in targets:
        achievable = low <= target <= high
        for name, rule in rules.items():
            point = evaluate_fitted(at_target(rule, target), test)
            point.pop("exit_layer")
            rows[name].append({"target": target, "achievable": achievable, "gap": point["accuracy"] - target,
                               "accuracy": point["accuracy"], "avg_layers": point["avg_layers"],
                               "saved_layers": point["saved_layers"]})
    summary = {}
    for name, entries in rows.items():
        used = [e for e in entries if e["achievable"]]
        gaps = [abs(e["gap"]) for e in used]
        summary[name] = {
            "mean_abs_gap": sum(gaps) / len(gaps) if gaps else None,
            "max_abs_gap": max(gaps) if gaps else None,
            "below_target": sum(e["gap"] < 0 for e in used),
            "below_target_by_more_than_1pt": sum(e["gap"] < -0.01 for e in used),
            "num_targets": len(used),
        }
    return {"targets": targets, "achievable_range": [low, high], "rules": rows, "summary": summary,
            "fitted": {name: rule.params for name, rule in rules.items()},
            "temperatures": rules["maxprob-ts"].temperatures_.tolist()}


def budget_sweep(fit: LogitCache, test: LogitCache, budgets=None, cost: str = "layers",
                 costs: list[float] | None = None) -> dict:
    """For each budget (fraction of the full cost), fit the budget rule on ``fit`` and measure ``test``."""
    budgets = list(DEFAULT_BUDGETS if budgets is None else budgets)
    rows = []
    for budget in budgets:
        try:
            rule = Budget(budget, cost, costs).fit(fit)
        except LayerExitError as err:  # a budget below the cost of exiting everything at layer 1
            rows.append({"asked": budget, "error": str(err)})
            continue
        point = evaluate_fitted(rule, test)
        achieved = rule.average_cost(point.pop("exit_layer"))
        rows.append({"asked": budget, "threshold": rule.threshold_, "fit_cost": rule.fit_cost_, "cost": achieved,
                     "relative_error": (achieved - budget) / budget, "accuracy": point["accuracy"],
                     "avg_layers": point["avg_layers"], "saved_layers": point["saved_layers"]})
    fitted = [r for r in rows if "cost" in r]
    errors = [abs(r["relative_error"]) for r in fitted]
    summary = {"mean_abs_relative_error": sum(errors) / len(errors) if errors else None,
               "max_abs_relative_error": max(errors) if errors else None,
               "within_5_percent": sum(e <= 0.05 for e in errors), "num_budgets": len(fitted)}
    return {"cost": cost, "rows": rows, "summary": summary}


def calibration_table(cache: LogitCache, temperatures: list[float] | None = None, num_bins: int = 15) -> list[dict]:
    """Per exit: accuracy, mean confidence, ECE (equal-width bins) before and, given temperatures, after
    temperature scaling; and the reliability bins for the diagrams."""
    rows = []
    for layer in range(cache.num_layers):
        confidence, correct = confidence_and_correct(cache.logits[layer], cache.labels)
        bins = reliability_bins(confidence, correct, num_bins, "width")
        row = {"exit": layer + 1, "accuracy": float(correct.double().mean()),
               "mean_confidence": float(confidence.mean()), "ece": bins.ece(), "bins": bins.to_dict()}
        if temperatures is not None:
            t = float(temperatures[layer])
            scaled_conf, scaled_correct = confidence_and_correct(cache.logits[layer], cache.labels, t)
            scaled = reliability_bins(scaled_conf, scaled_correct, num_bins, "width")
            row.update({"temperature": t, "ece_scaled": scaled.ece(), "bins_scaled": scaled.to_dict()})
        rows.append(row)
    return rows


def controllability(fit: LogitCache, test: LogitCache, targets=None, budgets=None, num_bins: int = 10,
                    binning: str = "width", smoothing: str = "neighbour", macs_costs: list[float] | None = None,
                    rules: dict | None = None) -> dict:
    """The whole controllability report (a results.json entry) plus the δ-sweep curves "pcee" and "pcee-ws".

    ``rules``: the target-accuracy rules already fitted on ``fit`` (see ``fit_rules``), to fit them once."""
    if fit.num_layers != test.num_layers:
        raise bad_value("fit cache", f"{fit.num_layers} layers", f"the test cache has {test.num_layers}; use "
                        "logits of the same model")
    sweep = target_sweep(fit, test, targets, num_bins, binning, smoothing, rules)
    budgets_out = {"layers": budget_sweep(fit, test, budgets, "layers")}
    if macs_costs is not None:
        budgets_out["macs"] = budget_sweep(fit, test, budgets, "macs", macs_costs)
    temperatures = sweep["temperatures"]
    report = {
        "simulated": True, "fit_split": fit.split, "eval_split": test.split,
        "num_fit_examples": int(fit.labels.numel()), "num_eval_examples": int(test.labels.numel()),
        "num_bins": num_bins, "binning": binning, "smoothing": smoothing,
        "fit_per_layer_accuracy": per_layer_accuracy(fit.logits, fit.labels),
        "target_accuracy": {k: v for k, v in sweep.items() if k != "temperatures"},
        "budgets": budgets_out,
        "calibration": {"fit": _strip_bins(calibration_table(fit, temperatures)),
                        "eval": calibration_table(test, temperatures)},
    }
    curves = {name: [{"params": {"target": e["target"]}, "accuracy": e["accuracy"], "avg_layers": e["avg_layers"],
                      "saved_layers": e["saved_layers"]} for e in sweep["rules"][name]]
              for name in ("pcee", "pcee-ws")}
    return {"controllability": report, "curves": curves}


def _strip_bins(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("bins")} for row in rows]


__all__ = ["DEFAULT_TARGETS", "DEFAULT_BUDGETS", "TARGET_RULES", "fit_rules", "at_target", "evaluate_fitted",
           "target_sweep", "budget_sweep", "calibration_table", "controllability"]

"""Accuracy control and budgets as part of an evaluation: fit PCEE, PCEE-WS, temperature-scaled max-prob and the
budget rule on one split, report them on another.

``calibrate`` is the library side of ``layerexit calibrate`` (fit on a validation split, save ``rules.json``,
draw reliability diagrams); ``control_report`` is what ``layerexit evaluate --calibration/--fit-split`` adds
to an evaluation. Each fits the PCEE tables once and reuses them at every target (a PCEE table does not
depend on the target accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..catalog import DEFAULT_ROUNDS
from ..data import Encoded, TextClassificationData, check_labels
from ..errors import bad_value
from ..io import write_json_atomic
from ..rules import Budget, ExitRule, MaxProb
from ..rules.fitting import check_calibration_backend, check_held_out, is_test_split, load_rules, save_rules
from .cache import LogitCache, collect_logits, tag_split
from .controllability import (DEFAULT_BUDGETS, DEFAULT_TARGETS, TARGET_RULES, at_target, calibration_table,
                              controllability, fit_rules)
from .cost import exit_costs
from .benchmark import compare_with_simulation, speed_report


@dataclass
class ControlOptions:
    """Where the control rules come from and what to report.

    Give ``calibration`` (a folder written by ``calibrate``: rules.json and fit_logits.pt) or ``fit_data``
    (another split of the data, fitted here). ``target_accuracy`` adds the rules at that target (and times
    PCEE and PCEE-WS there); ``budget`` adds the budget rule at that fraction of the full cost. The binning
    options apply with ``fit_data``; a calibration folder brings its own.
    """

    calibration: str | Path | None = None
    fit_data: TextClassificationData | None = None
    target_accuracy: float | None = None
    budget: float | None = None
    cost: str = "layers"
    num_bins: int = 10
    binning: str = "width"
    smoothing: str = "neighbour"

    def __post_init__(self):
        if not (self.calibration or self.fit_data is not None):
            value = self.target_accuracy if self.budget is None else self.budget
            raise bad_value("target_accuracy/budget", value,
                            "the rules must be fitted on another split first: pass --calibration DIR (from "
                            "`layerexit calibrate`) or --fit-split validation (calibration= or fit_data= in Python)")


def cache_split(model, tokenizer, data: TextClassificationData, batch_size: int = 128) -> tuple[LogitCache, Encoded]:
    """Every exit's logits over ``data``, tagged with its split name and the examples' digest."""
    check_labels(data, model.config.num_labels, model.config.label_names)
    encoded = Encoded(data, tokenizer, model.config.max_length)
    cache = collect_logits(model, encoded, batch_size)
    return tag_split(cache, data.split, encoded), encoded


def mean_tokens(encoded: Encoded) -> float:
    """Mean number of tokens per example (what the multiply-add costs of a budget are counted at)."""
    return sum(len(ids) for ids in encoded.features["input_ids"]) / max(1, len(encoded))


def fit_calibration_rules(fit: LogitCache, target: float = 0.9, num_bins: int = 10, binning: str = "width",
                          smoothing: str = "neighbour", budget: float | None = None, cost: str = "layers",
                          costs: list[float] | None = None) -> dict[str, ExitRule]:
    """The rules ``calibrate`` saves: PCEE, PCEE-WS, temperature-scaled max-prob, and the budget rule if asked."""
    rules = {name: rule for name, rule in fit_rules(fit, num_bins, binning, smoothing, target).items()
             if name != "maxprob"}  # plain max-prob learns nothing
    if budget is not None:
        rules["budget"] = Budget(budget, cost, costs if cost == "macs" else None).fit(fit)
    return rules


def calibrate(model, tokenizer, data: TextClassificationData, output: str | Path, target_accuracy: float = 0.9,
              budget: float | None = None, cost: str = "layers", num_bins: int = 10, binning: str = "width",
              smoothing: str = "neighbour", batch_size: int = 128, model_name: str = "", data_name: str = "") -> dict:
    """Fit the control rules on ``data`` (a validation split) and write, into ``output``: rules.json,
    fit_logits.pt, calibration.json (per exit: accuracy, confidence, ECE before and after temperature
    scaling), reliability.png and reliability/exit_<l>.png. Returns ``{"rules", "table", "split"}``."""
    from .calibration_plots import plot_reliability, plot_reliability_exit

    if is_test_split(data.split):
        raise bad_value("data.split", data.split, "rules are fitted on a validation split and reported on the "
                        "test split; calibrate on e.g. the 'validation' (or 'dev') split")
    fit, encoded = cache_split(model, tokenizer, data, batch_size)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    fit.save(output / "fit_logits.pt")
    costs = exit_costs(model, mean_tokens(encoded))
    rules = fit_calibration_rules(fit, target_accuracy, num_bins, binning, smoothing, budget, cost, costs)
    backend = model.backend.name  # thresholds hold for the logits of the backend they were fitted on
    save_rules(output / "rules.json", rules, model=model_name, data=data_name, split=data.split,
               num_examples=len(data), macs_per_exit=costs, backend=backend)
    table = calibration_table(fit, rules["maxprob-ts"].temperatures_.tolist())
    write_json_atomic(output / "calibration.json", {"model": model_name, "data": data_name, "split": data.split,
                                                    "backend": backend, "exits": table})
    plot_reliability(table, output / "reliability.png", f"reliability per exit on {data.split} ({len(data)} "
                     "examples); orange: after temperature scaling")
    for row in table:
        plot_reliability_exit(row, output / "reliability" / f"exit_{row['exit']}.png")
    return {"rules": rules, "table": table, "split": data.split}


def control_report(model, tokenizer, encoded: Encoded, test: LogitCache, options: ControlOptions,
                   batch_sizes: list[int] = (), measure_examples: int | None = None, rounds: int = DEFAULT_ROUNDS) -> dict:
    """The controllability report of ``test`` (a tagged cache of the evaluation split) and its curves.

    Returns ``{"controllability": report, "curves": {"pcee": [...], "pcee-ws": [...]}}``; with a target
    accuracy the report has ``asked_target`` and, given ``batch_sizes``, ``measured`` (PCEE and PCEE-WS at the
    target through the real engine, timed against the full model, simulated on the same rows).
    """
    fit, rules, binning = _fitted(model, tokenizer, options)
    for rule in rules.values():
        check_held_out(rule, test)  # a clear error before any work when the splits are the same
    targets = sorted(set(DEFAULT_TARGETS) | _given(options.target_accuracy))
    budgets = sorted(set(DEFAULT_BUDGETS) | _given(options.budget))
    costs = exit_costs(model, mean_tokens(encoded))
    out = controllability(fit, test, targets, budgets, *binning, costs, rules=rules)
    report = out["controllability"]
    if options.target_accuracy is not None:
        report["asked_target"] = {name: _row(rows, "target", options.target_accuracy)
                                  for name, rows in report["target_accuracy"]["rules"].items()}
        if batch_sizes:
            timed = {name: at_target(rules[name], options.target_accuracy) for name in ("pcee", "pcee-ws")}
            report["measured"] = [entry for batch_size in batch_sizes for entry in compare_with_simulation(
                speed_report(model, encoded, timed, batch_size, measure_examples, rounds), test, timed)]
    if options.budget is not None:
        report["asked_budget"] = {unit: _row(b["rows"], "asked", options.budget)
                                  for unit, b in report["budgets"].items()}
    return out


def write_control_figures(report: dict, folder: str | Path) -> None:
    """``controllability.png`` (target versus achieved) and ``budgets.png`` (budget asked versus achieved)."""
    from .calibration_plots import plot_budgets, plot_controllability

    plot_controllability(report, Path(folder) / "controllability.png")
    plot_budgets(report, Path(folder) / "budgets.png")


def _fitted(model, tokenizer, options: ControlOptions) -> tuple[LogitCache, dict, tuple[int, str, str]]:
    """The fitting cache and the target rules fitted once (or loaded, already fitted, from a calibration)."""
    if options.calibration:
        folder = Path(options.calibration)
        check_calibration_backend(folder, model.backend.name)
        saved = load_rules(folder / "rules.json")
        fit = LogitCache.load(folder / "fit_logits.pt")
        pcee = saved["pcee"]
        binning = (pcee.num_bins, pcee.binning, saved["pcee-ws"].smoothing)
        rules = {name: saved[name] if name in saved else MaxProb(0.9) for name in TARGET_RULES}
    else:
        fit, _ = cache_split(model, tokenizer, options.fit_data)
        binning = (options.num_bins, options.binning, options.smoothing)
        rules = fit_rules(fit, *binning)
    return fit, rules, binning


def _given(value: float | None) -> set[float]:
    return set() if value is None else {value}


def _row(rows: list[dict], key: str, value: float) -> dict:
    return next(r for r in rows if abs(r[key] - value) < 1e-12)


__all__ = ["ControlOptions", "cache_split", "calibrate", "control_report", "fit_calibration_rules", "mean_tokens",
           "write_control_figures"]

"""`layerexit calibrate`: fit the accuracy-control and budget rules on a validation split, save them, and draw
each exit's reliability diagram.

Writes into ``--output``: ``rules.json`` (PCEE, PCEE-WS, temperature-scaled max-prob and, with ``--budget``, the
budget rule; load them with ``layerexit.rules.fitting.load_rules``), ``fit_logits.pt`` (the validation cache,
tagged with its split, from which ``layerexit evaluate --calibration`` refits budgets), ``calibration.json``
(per exit: accuracy, mean confidence, ECE before and after temperature scaling) and ``reliability.png`` plus
``reliability/exit_<l>.png``. Fitting on a split named like a test split is refused.

Also holds the options ``layerexit evaluate`` gains from it: ``--calibration``, ``--fit-split``,
``--target-accuracy`` and ``--budget``.
"""

from __future__ import annotations

from pathlib import Path

from ..catalog import BINNINGS, COSTS, SMOOTHINGS
from ..errors import bad_value
from ..preflight import checkpoint_config, read_json, writable_folder
from .common import (Formatter, add_config_option, add_data_options, arg, at_least, data_from, in_range,
                     load_checkpoint, require)

EXAMPLES = """examples:
  layerexit calibrate --model runs/rt/best --split validation --output runs/rt/calibration
  layerexit calibrate --model runs/sst2/best --data ../shared/data/sst2 --split dev --target-accuracy 0.85 \\
      --budget 0.5 --output runs/sst2/calibration
  layerexit evaluate --model runs/sst2/best --data ../shared/data/sst2 --split test \\
      --calibration runs/sst2/calibration --target-accuracy 0.85 --budget 0.5 --output runs/sst2/eval
"""


def add_parser(subparsers):
    p = subparsers.add_parser("calibrate", help="fit PCEE / temperature / budget rules on validation data, "
                              "draw reliability diagrams", description=__doc__, epilog=EXAMPLES,
                              formatter_class=Formatter)
    add_config_option(p)
    p.add_argument("--model", help="checkpoint folder written by `layerexit train` (required)")
    add_data_options(p, split="validation")
    p.add_argument("--output", default="runs/calibration", help="folder for rules.json, plots, calibration.json")
    arg(p, "--target-accuracy", type=float, default=0.9, check=TARGET_CHECK, help="target accuracy δ stored in "
        "the rules (evaluate can use any other without refitting)")
    arg(p, "--budget", type=float, check=BUDGET_CHECK, help="also fit the budget rule: fraction of the full cost, "
        "e.g. 0.5")
    p.add_argument("--cost", default="layers", choices=list(COSTS), help="what the budget counts")
    add_bin_options(p)
    arg(p, "--batch-size", type=int, default=128, check=at_least(1), help="batch size for caching the exits' logits")
    p.set_defaults(run=run, check=check)
    return p


#: an accuracy target and a budget are fractions in (0, 1]
TARGET_CHECK = in_range(0, 1, low_open=True, example="0.9")
BUDGET_CHECK = in_range(0, 1, low_open=True, example="0.5 (half the full model's cost)")


def add_bin_options(p) -> None:
    arg(p, "--num-bins", type=int, default=10, check=at_least(1), help="PCEE bins per exit")
    p.add_argument("--binning", default="width", choices=list(BINNINGS), help="equal-width or equal-mass bins")
    p.add_argument("--smoothing", default="neighbour", choices=list(SMOOTHINGS), help="PCEE-WS smoothing")


def check(args) -> None:
    """Every option, the checkpoint's files and the output folder, before any model is loaded or logit computed."""
    from ..data import is_test_split

    require(args, "model", "--model runs/rt/best")
    if is_test_split(args.split):
        raise bad_value("--split", args.split, "rules are fitted on a validation split and reported on the test "
                        "split; calibrate on e.g. --split validation (or dev)")
    checkpoint_config("--model", args.model)
    writable_folder("--output", args.output)


def cache_split(model, tokenizer, data, batch_size: int = 128) -> "tuple[LogitCache, Encoded]":
    """Every exit's logits over ``data``, tagged with its split name and the examples' digest."""
    from ..data import Encoded, check_labels
    from ..evaluation.cache import collect_logits, tag_split

    check_labels(data, model.config.num_labels, model.config.label_names)
    encoded = Encoded(data, tokenizer, model.config.max_length)
    cache = collect_logits(model, encoded, batch_size)
    return tag_split(cache, data.split, encoded), encoded


def mean_tokens(encoded: "Encoded") -> float:
    return sum(len(ids) for ids in encoded.features["input_ids"]) / max(1, len(encoded))


def fit_all(fit: "LogitCache", target: float, num_bins: int, binning: str, smoothing: str,
            budget: float | None = None, cost: str = "layers", costs: list[float] | None = None) -> dict:
    from ..rules import PCEE, PCEEWS, Budget, TemperatureMaxProb

    rules = {
        "pcee": PCEE(target, num_bins, binning).fit(fit),
        "pcee-ws": PCEEWS(target, num_bins, binning, smoothing).fit(fit),
        "maxprob-ts": TemperatureMaxProb(target).fit(fit),
    }
    if budget is not None:
        rules["budget"] = Budget(budget, cost, costs if cost == "macs" else None).fit(fit)
    return rules


def run(args) -> int:
    data = data_from(args, label_names=None)  # data errors (bad rows, encodings) before torch or the model loads
    from ..evaluation.calibration_plots import plot_reliability, plot_reliability_exit
    from ..evaluation.controllability import calibration_table
    from ..evaluation.cost import exit_costs
    from ..io import write_json_atomic
    from ..rules.fitting import save_rules

    model, tokenizer = load_checkpoint(args)
    fit, encoded = cache_split(model, tokenizer, data, args.batch_size)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    fit.save(output / "fit_logits.pt")
    costs = exit_costs(model, mean_tokens(encoded))
    rules = fit_all(fit, args.target_accuracy, args.num_bins, args.binning, args.smoothing, args.budget,
                    args.cost, costs)
    save_rules(output / "rules.json", rules, model=str(args.model), data=str(args.data), split=data.split,
               num_examples=len(data), macs_per_exit=costs)
    table = calibration_table(fit, rules["maxprob-ts"].temperatures_.tolist())
    write_json_atomic(output / "calibration.json", {"model": str(args.model), "data": str(args.data),
                                                    "split": data.split, "exits": table})
    plot_reliability(table, output / "reliability.png", f"reliability per exit on {data.split} ({len(data)} "
                     "examples); orange: after temperature scaling")
    for row in table:
        plot_reliability_exit(row, output / "reliability" / f"exit_{row['exit']}.png")
    print(f"{'exit':>4} {'accuracy %':>10} {'confidence %':>12} {'ECE %':>6} {'T':>6} {'ECE after T %':>13}")
    for row in table:
        print(f"{row['exit']:>4} {100 * row['accuracy']:>10.1f} {100 * row['mean_confidence']:>12.1f} "
              f"{100 * row['ece']:>6.2f} {row['temperature']:>6.2f} {100 * row['ece_scaled']:>13.2f}")
    if "budget" in rules:
        b = rules["budget"]
        print(f"budget {b.budget:.2f} ({b.cost}): threshold {b.threshold_:.4f}, cost on {data.split} "
              f"{b.fit_cost_:.4f}, {b.fit_avg_layers_:.2f} layers")
    print(f"\nwrote {output}/rules.json, fit_logits.pt, calibration.json, reliability.png, reliability/")
    return 0


# --------------------------------------------------------------------------------- `layerexit evaluate` hooks


def add_control_options(p) -> None:
    """Options `layerexit evaluate` gains: accuracy targets and budgets from rules fitted on another split."""
    group = p.add_argument_group("accuracy control and budgets (PCEE)")
    group.add_argument("--calibration", help="folder written by `layerexit calibrate` (rules.json, fit_logits.pt)")
    group.add_argument("--fit-split", help="instead of --calibration: fit the rules here on this split of --data")
    arg(group, "--target-accuracy", type=float, check=TARGET_CHECK, help="report PCEE, PCEE-WS and max-prob at "
        "this target accuracy, and time PCEE at it")
    arg(group, "--budget", type=float, check=BUDGET_CHECK, help="report the budget rule at this fraction of the "
        "full cost")
    group.add_argument("--cost", default="layers", choices=list(COSTS), help="what --budget counts")
    arg(group, "--num-bins", type=int, default=10, check=at_least(1), help="PCEE bins per exit (with --fit-split)")
    group.add_argument("--binning", default="width", choices=list(BINNINGS), help="bin type (with --fit-split)")
    group.add_argument("--smoothing", default="neighbour", choices=list(SMOOTHINGS),
                       help="PCEE-WS smoothing (with --fit-split)")


def check_control(args) -> None:
    """The control options of `layerexit evaluate`, before any model is loaded."""
    from ..data import is_test_split

    wanted = args.calibration or args.fit_split or args.target_accuracy is not None or args.budget is not None
    if wanted and not (args.calibration or args.fit_split):
        raise bad_value("--target-accuracy/--budget", args.target_accuracy if args.budget is None else args.budget,
                        "the rules must be fitted on another split first: pass --calibration DIR (from `layerexit "
                        "calibrate`) or --fit-split validation")
    if args.fit_split and is_test_split(args.fit_split):
        raise bad_value("--fit-split", args.fit_split, "rules are fitted on a validation split; use e.g. "
                        "--fit-split validation (or dev)")
    if args.fit_split and args.fit_split == args.split:
        raise bad_value("--fit-split", args.fit_split, f"it is the split being evaluated (--split {args.split}): "
                        "rules fitted on the rows they are evaluated on say nothing about unseen data; fit on "
                        "another split (e.g. --fit-split dev with --split test)")
    if args.calibration:
        folder = Path(args.calibration)
        for name in ("rules.json", "fit_logits.pt"):
            if not (folder / name).is_file():
                raise bad_value("--calibration", args.calibration, f"it has no {name}; give a folder written by "
                                "`layerexit calibrate`")
        read_json(folder / "rules.json", "rules file")


def apply_control(args, model, tokenizer, data, results: dict) -> dict:
    """Add the controllability report to ``results`` (and results.json, plots) when asked for."""
    from ..data import Encoded
    from ..evaluation.cache import LogitCache, tag_split
    from ..evaluation.calibration_plots import plot_budgets, plot_controllability
    from ..evaluation.controllability import DEFAULT_BUDGETS, DEFAULT_TARGETS, controllability
    from ..evaluation.cost import exit_costs
    from ..io import write_json_atomic
    from ..rules.fitting import check_held_out, load_rules

    wanted = args.calibration or args.fit_split or args.target_accuracy is not None or args.budget is not None
    if not wanted:
        return results
    check_control(args)
    output = Path(args.output)
    encoded = Encoded(data, tokenizer, model.config.max_length)
    test = tag_split(LogitCache.load(output / "logits.pt"), data.split, encoded)
    if args.calibration:
        folder = Path(args.calibration)
        saved = load_rules(folder / "rules.json")
        fit = LogitCache.load(folder / "fit_logits.pt")
        pcee = saved["pcee"]
        num_bins, binning, smoothing = pcee.num_bins, pcee.binning, saved["pcee-ws"].smoothing
    else:
        fit_data = data_from(args, split=args.fit_split, label_names=None)
        fit, _ = cache_split(model, tokenizer, fit_data)
        num_bins, binning, smoothing = args.num_bins, args.binning, args.smoothing
    for rule in fit_all(fit, 0.9, num_bins, binning, smoothing).values():
        check_held_out(rule, test)  # a clear error before any work when the splits are the same
    targets = sorted(set(DEFAULT_TARGETS) | ({args.target_accuracy} if args.target_accuracy is not None else set()))
    budgets = sorted(set(DEFAULT_BUDGETS) | ({args.budget} if args.budget is not None else set()))
    costs = exit_costs(model, mean_tokens(encoded))
    out = controllability(fit, test, targets, budgets, num_bins, binning, smoothing, costs)
    report = out["controllability"]
    if args.target_accuracy is not None:
        report["asked_target"] = _at(report["target_accuracy"]["rules"], "target", args.target_accuracy)
        report["measured"] = _measure_pcee(model, encoded, fit, test, args, num_bins, binning, smoothing)
    if args.budget is not None:
        report["asked_budget"] = {unit: _row(b["rows"], "asked", args.budget) for unit, b in report["budgets"].items()}
    results["controllability"] = report
    results.setdefault("curves", {}).update(out["curves"])
    write_json_atomic(output / "results.json", results)
    plot_controllability(report, output / "controllability.png")
    plot_budgets(report, output / "budgets.png")
    _print_control(report, args)
    return results


def _at(rules: dict, key: str, value: float) -> dict:
    return {name: _row(rows, key, value) for name, rows in rules.items()}


def _row(rows: list[dict], key: str, value: float) -> dict:
    return next(r for r in rows if abs(r[key] - value) < 1e-12)


def _measure_pcee(model, encoded, fit, test, args, num_bins, binning, smoothing) -> list[dict]:
    """PCEE and PCEE-WS at the asked target through the real engine, timed against the full model."""
    import torch

    from ..evaluation.benchmark import speed_report
    from ..evaluation.simulate import simulate
    from .common import int_list

    rules = fit_all(fit, args.target_accuracy, num_bins, binning, smoothing)
    rules = {name: rules[name] for name in ("pcee", "pcee-ws")}
    entries = []
    for batch_size in int_list(args.batch_sizes):
        for entry in speed_report(model, encoded, rules, batch_size, limit=args.measure_examples, rounds=args.rounds):
            exit_layers = torch.tensor(entry.pop("exit_layers"))
            simulated = simulate(rules[entry["rule"]], test.logits[:, : len(exit_layers)])
            entry["matches_simulation"] = float((simulated.exit_layer == exit_layers).double().mean())
            entries.append(entry)
    return entries


def _print_control(report: dict, args) -> None:
    print(f"\naccuracy control (rules fitted on {report['fit_split']}, evaluated on {report['eval_split']}; "
          "simulated over cached logits):")
    for name, s in report["target_accuracy"]["summary"].items():
        gap = "n/a" if s["mean_abs_gap"] is None else f"{100 * s['mean_abs_gap']:.2f} pt"
        print(f"  {name:>11}: mean |target - achieved| {gap} over {s['num_targets']} achievable targets")
    if "asked_target" in report:
        for name, row in report["asked_target"].items():
            print(f"  target {100 * args.target_accuracy:.1f}%: {name:>11} reaches {100 * row['accuracy']:.1f}% "
                  f"with {row['avg_layers']:.2f} layers")
    if "asked_budget" in report:
        for unit, row in report["asked_budget"].items():
            if "cost" in row:
                print(f"  budget {100 * args.budget:.0f}% of the {unit}: reached {100 * row['cost']:.1f}% "
                      f"(accuracy {100 * row['accuracy']:.1f}%)")
            else:
                print(f"  budget {100 * args.budget:.0f}% of the {unit}: {row['error']}")

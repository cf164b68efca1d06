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

from ..catalog import BACKENDS, BINNINGS, COSTS, SMOOTHINGS
from ..data import is_test_split
from ..errors import bad_value
from ..preflight import checkpoint_config, read_json, writable_folder
from .common import (add_data_options, add_device_options, arg, at_least, command_parser, data_from, in_range,
                     load_checkpoint, require)

EXAMPLES = """examples:
  layerexit calibrate --model runs/rt/best --split validation --output runs/rt/calibration
  layerexit calibrate --model runs/sst2/best --data data/sst2 --split dev --target-accuracy 0.85 \\
      --budget 0.5 --output runs/sst2/calibration
  layerexit evaluate --model runs/sst2/best --data data/sst2 --split test \\
      --calibration runs/sst2/calibration --target-accuracy 0.85 --budget 0.5 --output runs/sst2/eval
"""

#: an accuracy target and a budget are fractions in (0, 1]
TARGET_CHECK = in_range(0, 1, low_open=True, example="0.9")
BUDGET_CHECK = in_range(0, 1, low_open=True, example="0.5 (half the full model's cost)")


def add_parser(subparsers):
    p = command_parser(subparsers, "calibrate", "fit PCEE / temperature / budget rules on validation data, "
                       "draw reliability diagrams", __doc__, EXAMPLES)
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
    arg(p, "--backend", default="eager", choices=sorted(BACKENDS), help="layer backend whose logits the rules are "
        "fitted on: the one that will serve (docs/backends.md); a saved MODEL/optimized/<backend>/ is used")
    add_device_options(p)
    p.set_defaults(run=run, check=check)
    return p


def add_bin_options(p) -> None:
    arg(p, "--num-bins", type=int, default=10, check=at_least(1), help="PCEE bins per exit")
    p.add_argument("--binning", default="width", choices=list(BINNINGS), help="equal-width or equal-mass bins")
    p.add_argument("--smoothing", default="neighbour", choices=list(SMOOTHINGS), help="PCEE-WS smoothing")


def check(args) -> None:
    """Every option, the checkpoint's files and the output folder, before any model is loaded or logit computed."""
    require(args, "model", "--model runs/rt/best")
    if is_test_split(args.split):
        raise bad_value("--split", args.split, "rules are fitted on a validation split and reported on the test "
                        "split; calibrate on e.g. --split validation (or dev)")
    checkpoint_config("--model", args.model)
    writable_folder("--output", args.output)


def run(args) -> int:
    data = data_from(args, label_names=None)  # data errors (bad rows, encodings) before torch or the model loads
    from ..evaluation.control import calibrate
    from ..evaluation.table import format_calibration
    from ..execution import own_process_options

    model, tokenizer = load_checkpoint(args)
    model.optimize(args.backend, saved=args.model, **own_process_options(args.backend))
    out = calibrate(model, tokenizer, data, args.output, args.target_accuracy, args.budget, args.cost, args.num_bins,
                    args.binning, args.smoothing, args.batch_size, model_name=str(args.model), data_name=str(args.data))
    print(format_calibration(out["table"], out["rules"].get("budget"), out["split"]))
    print(f"\nwrote {args.output}/rules.json, fit_logits.pt, calibration.json, reliability.png, reliability/")
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


def control_options(args, fit_data=None):
    """The evaluate command's control options as a ``ControlOptions`` (None when none was given)."""
    wanted = args.calibration or args.fit_split or args.target_accuracy is not None or args.budget is not None
    if not wanted:
        return None
    from ..evaluation.control import ControlOptions

    return ControlOptions(args.calibration, fit_data, args.target_accuracy, args.budget, args.cost, args.num_bins,
                          args.binning, args.smoothing)

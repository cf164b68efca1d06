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


from ..errors import bad_value
from ..evaluation.control import ControlOptions, calibrate
from ..evaluation.table import format_calibration
from ..rules.fitting import is_test_split
from .common import load_checkpoint, Formatter, add_config_option, add_data_options, data_from, require

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
    p.add_argument("--target-accuracy", type=float, default=0.9, help="target accuracy δ stored in the rules "
                   "(evaluate can use any other without refitting)")
    p.add_argument("--budget", type=float, help="also fit the budget rule: fraction of the full cost, e.g. 0.5")
    p.add_argument("--cost", default="layers", choices=["layers", "macs"], help="what the budget counts")
    add_bin_options(p)
    p.add_argument("--batch-size", type=int, default=128, help="batch size for caching the exits' logits")
    p.set_defaults(run=run)
    return p


def add_bin_options(p) -> None:
    p.add_argument("--num-bins", type=int, default=10, help="PCEE bins per exit")
    p.add_argument("--binning", default="width", choices=["width", "mass"], help="equal-width or equal-mass bins")
    p.add_argument("--smoothing", default="neighbour", choices=["neighbour", "isotonic"], help="PCEE-WS smoothing")


def run(args) -> int:
    require(args, "model", "--model runs/rt/best")
    if is_test_split(args.split):
        raise bad_value("--split", args.split, "rules are fitted on a validation split and reported on the test "
                        "split; calibrate on e.g. --split validation (or dev)")
    model, tokenizer = load_checkpoint(args)
    data = data_from(args, label_names=None)
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
    group.add_argument("--target-accuracy", type=float, help="report PCEE, PCEE-WS and max-prob at this target "
                       "accuracy, and time PCEE at it")
    group.add_argument("--budget", type=float, help="report the budget rule at this fraction of the full cost")
    group.add_argument("--cost", default="layers", choices=["layers", "macs"], help="what --budget counts")
    group.add_argument("--num-bins", type=int, default=10, help="PCEE bins per exit (with --fit-split)")
    group.add_argument("--binning", default="width", choices=["width", "mass"], help="bin type (with --fit-split)")
    group.add_argument("--smoothing", default="neighbour", choices=["neighbour", "isotonic"],
                       help="PCEE-WS smoothing (with --fit-split)")


def control_options(args, fit_data=None) -> ControlOptions | None:
    """The evaluate command's control options as a ``ControlOptions`` (None when none was given)."""
    wanted = args.calibration or args.fit_split or args.target_accuracy is not None or args.budget is not None
    if not wanted:
        return None
    return ControlOptions(args.calibration, fit_data, args.target_accuracy, args.budget, args.cost, args.num_bins,
                          args.binning, args.smoothing)

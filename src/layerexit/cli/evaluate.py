"""`layerexit evaluate`: every rule over every threshold (simulated), operating points timed (measured)."""

from __future__ import annotations

from ..consistentee.sweep import set_alpha
from ..evaluation.evaluate import evaluate
from ..evaluation.table import format_summary
from ..rules import DEFAULT_SWEEP
from .calibrate import add_control_options, control_options
from .common import load_checkpoint, Formatter, add_config_option, add_data_options, data_from, int_list, name_list

EXAMPLES = """examples:
  layerexit evaluate --model runs/rt/best --output runs/rt/eval
  layerexit evaluate --model runs/sst2/best --data ../shared/data/sst2 --split test --output runs/sst2/eval
  layerexit evaluate --model runs/rt/best --rules maxprob,patience --measure-rules maxprob --batch-sizes 1
  layerexit evaluate --model runs/rt/best --calibration runs/rt/calibration --target-accuracy 0.85 --budget 0.5
"""


def add_parser(subparsers):
    p = subparsers.add_parser("evaluate", help="sweep every exit rule, time operating points, write a report",
                              description=__doc__, epilog=EXAMPLES, formatter_class=Formatter)
    add_config_option(p)
    p.add_argument("--model", help="checkpoint folder written by `layerexit train` (required)")
    add_data_options(p, split="test")
    p.add_argument("--output", default="runs/eval", help="report folder")
    p.add_argument("--rules", default=",".join(DEFAULT_SWEEP), help="rules to sweep, comma separated")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="operating point: most layers saved with accuracy >= full - tolerance")
    p.add_argument("--measure-rules", help="rules whose operating point is timed (default: all swept; '' for none)")
    p.add_argument("--batch-sizes", default="1,32", help="batch sizes for the wall-clock measurement")
    p.add_argument("--measure-examples", type=int, default=500, help="examples timed per batch size")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (median is reported)")
    add_control_options(p)
    p.add_argument("--alpha", type=float, help="alpha-conditioned ConsistentEE model: the layer-cost dial its "
                   "policy uses (default: the one it was trained with); larger alpha, earlier exits")
    p.add_argument("--consistentee-runs", help="ConsistentEE `final` folders trained with different --alpha, comma "
                   "separated: adds the 'consistentee' curve (each model's policy at threshold 0.5)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    fit_data = data_from(args, split=args.fit_split, label_names=None) if args.fit_split else None
    control = control_options(args, fit_data)
    data = data_from(args, label_names=None)
    model, tokenizer = load_checkpoint(args)
    if args.alpha is not None:
        set_alpha(model, args.alpha)
    rules = name_list(args.rules)
    measure = rules if args.measure_rules is None else name_list(args.measure_rules)
    results = evaluate(model, tokenizer, data, args.output, rules, args.tolerance, measure,
                       tuple(int_list(args.batch_sizes)), args.measure_examples, args.rounds, control=control,
                       consistentee_runs=name_list(args.consistentee_runs or ""))
    print(format_summary(results, args.tolerance))
    print(f"\nwrote {args.output}/results.json, report.md, tradeoff.png, per_layer_accuracy.png")
    return 0

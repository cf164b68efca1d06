"""`layerexit evaluate`: every rule over every threshold (simulated), operating points timed (measured)."""

from __future__ import annotations

from ..catalog import BACKENDS, DEFAULT_ROUNDS, DEFAULT_SWEEP, DEFAULT_TOLERANCE, RULES
from ..preflight import checkpoint_config, writable_folder
from .calibrate import add_control_options, check_control, control_options
from .common import (add_data_options, add_device_options, arg, at_least, command_parser, data_from, in_range,
                     int_list, known_names, load_checkpoint, name_list, positive_int_list, require)

EXAMPLES = """examples:
  layerexit evaluate --model runs/rt/best --output runs/rt/eval
  layerexit evaluate --model runs/sst2/best --data data/sst2 --split test --output runs/sst2/eval
  layerexit evaluate --model runs/rt/best --rules maxprob,patience --measure-rules maxprob --batch-sizes 1
  layerexit evaluate --model runs/rt/best --calibration runs/rt/calibration --target-accuracy 0.85 --budget 0.5
"""


def add_parser(subparsers):
    p = command_parser(subparsers, "evaluate", "sweep every exit rule, time operating points, write a report",
                       __doc__, EXAMPLES)
    p.add_argument("--model", help="checkpoint folder written by `layerexit train` (required)")
    add_data_options(p, split="test")
    p.add_argument("--output", default="runs/eval", help="report folder")
    arg(p, "--backend", default="eager", choices=sorted(BACKENDS),
        help="layer backend (docs/backends.md); thresholds are fitted with its own logits")
    arg(p, "--rules", default=",".join(DEFAULT_SWEEP), check=known_names("--rules", RULES),
        help="rules to sweep, comma separated")
    arg(p, "--tolerance", type=float, default=DEFAULT_TOLERANCE, check=in_range(0, 1, example="0.01"),
        help="operating point: most layers saved with accuracy >= full - tolerance")
    arg(p, "--measure-rules", check=known_names("--measure-rules", RULES),
        help="rules whose operating point is timed (default: all swept; '' for none)")
    arg(p, "--batch-sizes", default="1,32", check=positive_int_list("--batch-sizes"),
        help="batch sizes for the wall-clock measurement")
    arg(p, "--measure-examples", type=int, default=500, check=at_least(1), help="examples timed per batch size")
    arg(p, "--rounds", type=int, default=DEFAULT_ROUNDS, check=at_least(1),
        help="interleaved timing rounds (median and spread are reported; fewer than 3 is flagged)")
    add_control_options(p)
    arg(p, "--alpha", type=float,
        help="alpha-conditioned ConsistentEE model: the layer-cost dial its policy uses (default: the one it was "
        "trained with), within its trained range; larger alpha, earlier exits")
    p.add_argument("--consistentee-runs", help="ConsistentEE `final` folders trained with different --alpha, comma "
                   "separated: adds the 'consistentee' curve (each model's policy at threshold 0.5)")
    add_device_options(p)
    p.set_defaults(run=run, check=check)
    return p


def check(args) -> None:
    """The checkpoint's files, the control options and the report folder, before any model is loaded."""
    require(args, "model", "--model runs/rt/best")
    checkpoint_config("--model", args.model)
    check_control(args)
    for run_folder in name_list(args.consistentee_runs or ""):
        checkpoint_config("--consistentee-runs", run_folder)
    writable_folder("--output", args.output)


def run(args) -> int:
    # data first (bad rows, encodings), then torch and the model
    fit_data = data_from(args, split=args.fit_split, label_names=None) if args.fit_split else None
    control = control_options(args, fit_data)
    data = data_from(args, label_names=None)
    from ..evaluation.evaluate import evaluate
    from ..evaluation.table import format_summary
    from ..execution import own_process_options

    model, tokenizer = load_checkpoint(args)
    # a saved optimized/<backend>/ beside the checkpoint wins over building the backend now
    model.optimize(args.backend, saved=args.model, **own_process_options(args.backend))
    if args.alpha is not None:
        from ..consistentee.sweep import set_alpha

        set_alpha(model, args.alpha)
    rules = name_list(args.rules)
    measure = rules if args.measure_rules is None else name_list(args.measure_rules)
    results = evaluate(model, tokenizer, data, args.output, rules, args.tolerance, measure,
                       tuple(int_list(args.batch_sizes)), args.measure_examples, args.rounds, control=control,
                       consistentee_runs=name_list(args.consistentee_runs or ""), provenance=provenance(args))
    print(format_summary(results, args.tolerance))
    print(f"\nwrote {args.output}/results.json, report.md, tradeoff.png, per_layer_accuracy.png")
    return 0


def provenance(args) -> dict:
    """What results.json records about its own making: the options given, the checkpoint's effective training
    configuration (``layerexit train`` writes it beside the weights) and the library versions."""
    import platform

    import torch
    import transformers

    from .. import __version__
    from ..training.runfolder import training_config

    options = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None), list))}
    versions = {"layerexit": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    return {"command": "layerexit evaluate", "options": options, "training": training_config(args.model),
            "versions": versions, "python": platform.python_version()}

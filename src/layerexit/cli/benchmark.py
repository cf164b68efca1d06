"""`layerexit benchmark`: wall clock of the full model and early exit in one process, at batch 1 and 32.

Reports the measured speed-up, the ideal speed-up L / avg_layers, their ratio, and the exit heads'
overhead on the full path. Without --param, the rule's operating point (most layers saved within
--tolerance of the full model's accuracy) is found by simulation on the same data first.
"""

from __future__ import annotations

import json

from ..catalog import BACKENDS, DEFAULT_ROUNDS, DEFAULT_TOLERANCE, RULES
from ..preflight import checkpoint_config, writable_file
from .common import (add_data_options, add_device_options, arg, at_least, command_parser, data_from, in_range,
                     int_list, load_checkpoint, parse_rule_params, positive_int_list, require)

EXAMPLES = """examples:
  layerexit benchmark --model runs/rt/best --rule maxprob --param threshold=0.9
  layerexit benchmark --model runs/sst2/best --data data/sst2 --split test --rule patience
"""


def add_parser(subparsers):
    p = command_parser(subparsers, "benchmark", "time the full model against early exit", __doc__, EXAMPLES)
    p.add_argument("--model", help="checkpoint folder (required)")
    add_data_options(p, split="test")
    p.add_argument("--rule", default="maxprob", choices=sorted(RULES))
    p.add_argument("--param", action="append", help="rule parameter NAME=VALUE (repeatable)")
    arg(p, "--tolerance", type=float, default=DEFAULT_TOLERANCE, check=in_range(0, 1, example="0.01"),
        help="without --param: the operating point keeps accuracy >= full - tolerance")
    arg(p, "--backend", default="eager", choices=sorted(BACKENDS),
        help="layer backend (docs/backends.md); thresholds are fitted with its own logits")
    arg(p, "--batch-sizes", default="1,32", check=positive_int_list("--batch-sizes"), help="batch sizes timed")
    arg(p, "--examples", type=int, default=500, check=at_least(1), help="examples timed per batch size")
    arg(p, "--rounds", type=int, default=DEFAULT_ROUNDS, check=at_least(1),
        help="interleaved timing rounds (median and spread are reported; fewer than 3 is flagged)")
    p.add_argument("--output", help="write the JSON here")
    add_device_options(p)
    p.set_defaults(run=run, check=check)
    return p


def check(args) -> None:
    """Every option, the checkpoint's files and the output file, before any model is loaded."""
    require(args, "model", "--model runs/rt/best")
    parse_rule_params(args.param)
    checkpoint_config("--model", args.model)
    if args.output:
        writable_file("--output", args.output)


def run(args) -> int:
    data = data_from(args)  # data errors (bad rows, encodings) before torch or the model loads
    from ..evaluation.evaluate import benchmark
    from ..evaluation.table import format_measured
    from ..io import write_json_atomic
    from ..execution import own_process_options

    model, tokenizer = load_checkpoint(args)
    # a saved optimized/<backend>/ beside the checkpoint wins over building the backend now
    model.optimize(args.backend, saved=args.model, **own_process_options(args.backend))
    entries = benchmark(model, tokenizer, data, args.rule, parse_rule_params(args.param), args.tolerance,
                        tuple(int_list(args.batch_sizes)), args.examples, args.rounds)
    for entry in entries:
        print(format_measured(entry, model.config.num_layers))
    payload = {"model": args.model, "data": args.data, "split": args.split, "measured": entries}
    if args.output:
        write_json_atomic(args.output, payload)
    else:
        print(json.dumps(payload, indent=2))
    return 0

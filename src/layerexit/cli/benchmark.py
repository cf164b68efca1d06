"""`layerexit benchmark`: wall clock of the full model and early exit in one process, at batch 1 and 32.

Reports the measured speed-up, the ideal speed-up L / avg_layers, their ratio, and the exit heads'
overhead on the full path. Without --param, the rule's operating point (most layers saved within
--tolerance of the full model's accuracy) is found by simulation on the same data first.
"""

from __future__ import annotations

import json


from ..evaluation.evaluate import benchmark
from ..evaluation.table import format_measured
from ..io import write_json_atomic
from ..rules import RULES
from .common import load_checkpoint, Formatter, add_config_option, add_data_options, data_from, int_list, parse_rule_params

EXAMPLES = """examples:
  layerexit benchmark --model runs/rt/best --rule maxprob --param threshold=0.9
  layerexit benchmark --model runs/sst2/best --data ../shared/data/sst2 --split test --rule patience
"""


def add_parser(subparsers):
    p = subparsers.add_parser("benchmark", help="time the full model against early exit",
                              description=__doc__, epilog=EXAMPLES, formatter_class=Formatter)
    add_config_option(p)
    p.add_argument("--model", help="checkpoint folder (required)")
    add_data_options(p, split="test")
    p.add_argument("--rule", default="maxprob", choices=RULES.names())
    p.add_argument("--param", action="append", help="rule parameter NAME=VALUE (repeatable)")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--examples", type=int, default=500, help="examples timed per batch size")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--output", help="write the JSON here")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    model, tokenizer = load_checkpoint(args)
    data = data_from(args)
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

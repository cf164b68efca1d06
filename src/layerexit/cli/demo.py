"""`layerexit demo`: the main job, offline. Fine-tunes the packaged 6-layer MiniLM with an exit after every
layer on the packaged movie-review snippets, sweeps every exit rule on the test split, times the operating
points, prints a table and writes a report folder (results.json, report.md, plots).

Full run: about ten minutes on 2 CPU cores. --quick: a small slice in about a minute.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..preflight import writable_folder
from ..resources import DEFAULT_MODEL
from .common import Formatter

EXAMPLES = """examples:
  layerexit demo                     # about 10 minutes on 2 CPU cores
  layerexit demo --quick             # about a minute, small slice
"""

# "measure": rows timed (None: every test row, so the measured and simulated tables cover the same rows);
# at least 3 timing rounds, so every speed-up comes with its spread
FULL = {"train": 6000, "eval": 500, "test": None, "epochs": 2, "measure": 300, "rounds": 3,
        "measure_rules": ["maxprob", "entropy", "patience"]}
QUICK = {"train": 400, "eval": 100, "test": 200, "epochs": 1, "measure": None, "rounds": 3,
         "measure_rules": ["maxprob"]}


def add_parser(subparsers):
    p = subparsers.add_parser("demo", help="train + evaluate the packaged MiniLM on packaged data (offline)",
                              description=__doc__, epilog=EXAMPLES, formatter_class=Formatter)
    p.add_argument("--quick", action="store_true", help="small slice, about a minute")
    p.add_argument("--output", default="runs/demo", help="report folder")
    p.add_argument("--model", default=DEFAULT_MODEL, help="backbone")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.set_defaults(run=run, check=lambda args: writable_folder("--output", args.output))
    return p


def run(args) -> int:
    from ..data import load_data
    from ..evaluation.evaluate import evaluate
    from ..evaluation.table import format_summary
    from ..training import TrainConfig
    from ..training.run import train_classifier

    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    output = Path(args.output)
    train_data = load_data("rotten-tomatoes", "train", limit=plan["train"])
    eval_data = load_data("rotten-tomatoes", "validation", limit=plan["eval"])
    test_data = load_data("rotten-tomatoes", "test", limit=plan["test"])
    print(f"layerexit demo: {args.model} on rotten-tomatoes, {len(train_data)} train / {len(eval_data)} validation "
          f"/ {len(test_data)} test snippets, {plan['epochs']} epoch(s)")
    config = TrainConfig(epochs=plan["epochs"], batch_size=32, learning_rate=5e-5, seed=args.seed, save_steps=100)
    model, tokenizer, _ = train_classifier(args.model, train_data, eval_data, output / "model", max_length=64,
                                           config=config, resume=False)
    results = evaluate(model, tokenizer, test_data, output, measure_rules=plan["measure_rules"],
                       batch_sizes=(1, 32), measure_examples=plan["measure"], rounds=plan["rounds"])
    print()
    print(format_summary(results))
    print(f"\nreport: {output / 'report.md'}  ({time.perf_counter() - started:.0f} s)")
    return 0

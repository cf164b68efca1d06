"""`layerexit demo`: the main job, offline. Fine-tunes the packaged 6-layer MiniLM with an exit after every
layer on the packaged movie-review snippets, trains ConsistentEE's exit policies on it (a short schedule: an
alpha-conditioned policy, so one model gives the whole alpha curve), fits PCEE on the validation split, sweeps
every exit rule on the test split, times the operating points, prints one table comparing ConsistentEE, PCEE and
the classic rules, and writes a report folder (results.json, report.md, plots).

Full run: about a quarter of an hour on 2 CPU cores (ConsistentEE: stage 2 and one stage-3 epoch on 2,000
snippets). --quick: a small slice, policies only (no stage 3), in about a minute.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..preflight import writable_folder
from ..resources import DEFAULT_MODEL
from .common import command_parser

EXAMPLES = """examples:
  layerexit demo                     # about 10 minutes on 2 CPU cores
  layerexit demo --quick             # about a minute, small slice
"""

# "measure": rows timed (None: every test row, so the measured and simulated tables cover the same rows);
# at least 3 timing rounds, so every speed-up comes with its spread
FULL = {"train": 6000, "eval": 500, "test": None, "epochs": 2, "measure": 300, "rounds": 3,
        "measure_rules": ["maxprob", "entropy", "patience", "consistentee"], "cee_train": 2000,
        "stage2_epochs": 10, "stage3_epochs": 1, "copies": 8}
QUICK = {"train": 400, "eval": 100, "test": 200, "epochs": 1, "measure": None, "rounds": 3,
         "measure_rules": ["maxprob"], "cee_train": 400, "stage2_epochs": 10, "stage3_epochs": 0, "copies": 4}
#: the layer-cost range the demo's alpha-conditioned ConsistentEE policy is trained on (its dial)
DEMO_ALPHA_RANGE = (-0.5, 2.0)


def add_parser(subparsers):
    p = command_parser(subparsers, "demo", "train + evaluate the packaged MiniLM on packaged data (offline)",
                       __doc__, EXAMPLES, config=False)
    p.add_argument("--quick", action="store_true", help="small slice, about a minute")
    p.add_argument("--output", default="runs/demo", help="report folder")
    p.add_argument("--model", default=DEFAULT_MODEL, help="backbone")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.set_defaults(run=run, check=lambda args: writable_folder("--output", args.output))
    return p


def run(args) -> int:
    from ..consistentee import train_consistentee
    from ..consistentee.config import ConsistentEEConfig
    from ..data import load_data
    from ..evaluation.control import ControlOptions
    from ..evaluation.evaluate import evaluate
    from ..evaluation.table import format_summary
    from ..rules import DEFAULT_SWEEP
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
    cee = ConsistentEEConfig(alpha=1.0, alpha_range=DEMO_ALPHA_RANGE, copies=plan["copies"],
                             stage2_epochs=plan["stage2_epochs"], stage3_epochs=plan["stage3_epochs"])
    print(f"ConsistentEE on it: alpha-conditioned policy (alpha in {DEMO_ALPHA_RANGE}), stage 2 "
          f"({plan['stage2_epochs']} epochs, K={plan['copies']}), stage 3 ({plan['stage3_epochs']} epoch(s)), on "
          f"{min(plan['cee_train'], len(train_data))} snippets")
    cee_model, _ = train_consistentee(args.model, train_data.head(plan["cee_train"]), eval_data,
                                      output / "consistentee", cee, config, max_length=64,
                                      stage1_dir=output / "model")
    # classic rules and PCEE (fitted on the validation split) on the weighted model; ConsistentEE's curves come
    # from its own model (the same exits when stage 3 is skipped) and are added beside them
    classic = [r for r in DEFAULT_SWEEP if r != "consistentee"]
    measure = [r for r in plan["measure_rules"] if r != "consistentee"]
    results = evaluate(model, tokenizer, test_data, output, classic, measure_rules=measure,
                       batch_sizes=(1, 32), measure_examples=plan["measure"], rounds=plan["rounds"],
                       control=ControlOptions(fit_data=eval_data))
    results = add_consistentee(results, cee_model, tokenizer, test_data, output, plan)
    print()
    print(format_summary(results))
    print(f"\nreport: {output / 'report.md'}  ({time.perf_counter() - started:.0f} s)")
    return 0


def add_consistentee(results, cee_model, tokenizer, test_data, output, plan) -> dict:
    """Add ConsistentEE's curves (its alpha dial and its threshold sweep, from the ConsistentEE model) to
    ``results`` and rewrite results.json and report.md; its operating point is also timed when the plan asks."""
    from ..data import Encoded
    from ..evaluation.cache import collect_logits
    from ..evaluation.evaluate import measured_results, sweep
    from ..evaluation.metrics import operating_point
    from ..evaluation.report import write_report
    from ..io import write_json_atomic

    test_set = Encoded(test_data, tokenizer, cee_model.config.max_length)
    cee_cache = collect_logits(cee_model, test_set, progress=False)
    results["curves"].update(sweep(cee_cache, ["consistentee"]))
    full = results["full"]["accuracy"]
    results["operating_points"] = {name: operating_point(c, full, results["tolerance"])
                                   for name, c in results["curves"].items()}
    if "consistentee" in plan["measure_rules"]:
        results["measured"] += measured_results(cee_model, test_set, cee_cache, results, ["consistentee"], [1, 32],
                                                plan["measure"], plan["rounds"])
    write_json_atomic(output / "results.json", results)
    write_report(results, output, tolerance=results["tolerance"])
    return results

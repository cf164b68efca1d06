"""Classic exit rules benchmark: MiniLM-L6 with exits on GLUE SST-2.

Trains the packaged MiniLM-L6 with an exit after every layer on the first N SST-2 training phrases (dev split
for model selection), evaluates on GLUE SST-2 validation (``test.tsv``, 872 sentences): per-layer accuracy,
both oracles, every rule's simulated curve, and each rule's operating point (most layers saved within one
accuracy point of the full model) run through the engine and timed against the full model at batch 1 and 32,
all in this one process. Writes ``benchmarks/results/sst2_minilm.json`` and a report folder.

    .venv/bin/python benchmarks/sst2_minilm.py --data data/sst2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from layerexit.data import load_data
from layerexit.evaluation.evaluate import evaluate
from layerexit.evaluation.table import format_table

from common import train_or_reuse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with train.tsv, dev.tsv, test.tsv")
    parser.add_argument("--train-examples", type=int, default=8000)
    parser.add_argument("--dev-examples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--exit-feature", default=None, help="default: the checkpoint's declared pooling (mean)")
    parser.add_argument("--objective", default="weighted")
    parser.add_argument("--run-dir", default="runs/bench-sst2")
    parser.add_argument("--output", default="benchmarks/results/sst2_minilm.json")
    parser.add_argument("--measure-examples", type=int, default=872)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="skip training if RUN_DIR/model/best exists")
    args = parser.parse_args()

    started = time.perf_counter()
    run_dir = Path(args.run_dir)
    model, tokenizer = train_or_reuse("all-MiniLM-L6-v2", args.data, run_dir, args.train_examples, args.dev_examples,
                                      args.epochs, args.objective, args.exit_feature, reuse=args.reuse)
    trained = time.perf_counter()
    test_data = load_data(args.data, "test")
    results = evaluate(model, tokenizer, test_data, run_dir / "eval", tolerance=0.01,
                       batch_sizes=(1, 32), measure_examples=args.measure_examples, rounds=args.rounds)
    print(format_table(results, 0.01))
    summary = []
    for entry in results["measured"]:
        target = 0.9 if entry["batch_size"] == 1 else 0.8
        summary.append({
            "rule": entry["rule"], "batch_size": entry["batch_size"], "accuracy": entry["accuracy"],
            "speedup_measured": entry["speedup_measured"], "speedup_ideal": entry["speedup_ideal"],
            "ratio_to_ideal": entry["ratio_to_ideal"], "ratio_target": target,
            "ratio_met": entry["ratio_to_ideal"] >= target,
            "overhead_heads": entry["overhead_heads"], "overhead_met": entry["overhead_heads"] <= 0.03,
        })
    payload = {
        "benchmark": "sst2_minilm", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "args": vars(args), "train_seconds": trained - started, "total_seconds": time.perf_counter() - started,
        "exit_feature": model.config.exit_feature, "targets": summary, "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    for row in summary:
        print(f"{row['rule']:>20} batch {row['batch_size']:>2}: measured {row['speedup_measured']:.2f}x / ideal "
              f"{row['speedup_ideal']:.2f}x = {row['ratio_to_ideal']:.2f} (target {row['ratio_target']}); "
              f"heads overhead {100 * row['overhead_heads']:.1f}%")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

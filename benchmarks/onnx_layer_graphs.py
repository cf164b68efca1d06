"""How the layer graphs of the ONNX backends are cut, compared on one model: saved optimized folders (each
from ``model.save_optimized``, possibly written by different layerexit versions), timed in one process,
interleaved rounds, at one batch size, both as the backend's full model (every layer, last exit) and as early
exit with one max-prob threshold. Per-round paired ratios against the first folder, and measured/ideal.

    flock /tmp/layerexit-heavy.lock env PYTHONPATH=src python benchmarks/onnx_layer_graphs.py \\
        --model runs/sst2-minilm/best --data DATA --backend onnx \\
        --folders "host heads=runs/opt-old/optimized/onnx,exits in graphs=runs/opt-new/optimized/onnx"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_backends import (cpu_info, cpu_ticks, interleaved, layerexit_early, layerexit_full, loadavg,  # noqa: E402
                          steal_percent)

from layerexit.allocator import keep_freed_memory  # noqa: E402
from layerexit.data import Encoded, load_data  # noqa: E402
from layerexit.evaluation.benchmark import Batches  # noqa: E402
from layerexit.evaluation.timing import paired_speedup  # noqa: E402
from layerexit.execution.onnx import use_shared_thread_pool  # noqa: E402
from layerexit.io import write_json_atomic  # noqa: E402
from layerexit.model import MultiExitModel  # noqa: E402
from layerexit.rules import make_rule  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="folder with test.tsv (SST-2)")
    parser.add_argument("--backend", default="onnx", choices=["onnx", "onnx-int8"])
    parser.add_argument("--folders", required=True, help="'LABEL=FOLDER,LABEL=FOLDER,...'; the first is the reference")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.672, help="max-prob threshold of the early-exit runs")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/onnx_layer_graphs.json")
    args = parser.parse_args()
    items = [item.split("=", 1) for item in args.folders.split(",")]
    if any(len(item) != 2 for item in items):
        parser.error(f"--folders={args.folders!r}: give LABEL=FOLDER pairs separated by commas")
    folders = dict(items)

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    use_shared_thread_pool(args.threads)
    load_before, ticks = loadavg(), cpu_ticks()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    variants, models = {}, {}
    for label, folder in folders.items():
        model = MultiExitModel.from_pretrained(args.model).eval()
        model.optimize(args.backend, saved=folder, thread_pool="shared")
        models[label] = model
        variants[f"{label} | full"] = layerexit_full(model)
        variants[f"{label} | early exit"] = layerexit_early(model, make_rule("maxprob", threshold=args.threshold))
    encoded = Encoded(load_data(args.data, "test", limit=args.examples), tokenizer, models[label].config.max_length)
    batches = Batches.build(encoded, args.batch_size)
    seconds = interleaved(variants, batches, args.rounds)["seconds"]  # one warm-up round, then the timed ones

    num_layers = models[label].config.num_layers
    reference = next(iter(folders))
    rows = {}
    for label in folders:
        exits = variants[f"{label} | early exit"].exit_layers
        avg = float(torch.cat([torch.as_tensor(e).reshape(-1) for e in exits]).float().mean())
        full, early = seconds[f"{label} | full"], seconds[f"{label} | early exit"]
        speedups = [f / e for f, e in zip(full, early)]
        rows[label] = {
            "describe": models[label].backend.describe(), "folder": folders[label], "avg_layers": avg,
            "full_seconds": statistics.median(full), "early_seconds": statistics.median(early),
            "speedup": statistics.median(speedups), "ideal": num_layers / avg,
            "ratio_to_ideal": statistics.median(speedups) / (num_layers / avg),
            "full_vs_reference": paired_speedup(seconds[f"{reference} | full"], full),
            "early_vs_reference": paired_speedup(seconds[f"{reference} | early exit"], early),
            "rounds": {"full": full, "early": early},
        }
        print(f"{label:28s} full {rows[label]['full_seconds']:.3f} s, early exit {rows[label]['early_seconds']:.3f} s "
              f"(avg {avg:.2f} layers), speed-up {rows[label]['speedup']:.2f} / ideal {num_layers / avg:.2f} = "
              f"{rows[label]['ratio_to_ideal']:.2f}; vs {reference}: full {rows[label]['full_vs_reference']['median']:.2f}x, "
              f"early {rows[label]['early_vs_reference']['median']:.2f}x")
    write_json_atomic(args.output, {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "args": vars(args), "cpu": cpu_info(), "loadavg_before": load_before, "loadavg_after": loadavg(),
        "steal_percent": steal_percent(ticks, cpu_ticks()), "results": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

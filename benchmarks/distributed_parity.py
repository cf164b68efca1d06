"""Data parallel training gives the accuracy of one process at the same global batch.

Trains the same recipe twice with the real CLI: one process with ``--batch-size B`` and ``torchrun`` with two
processes of ``--batch-size B/2`` (gloo on the CPU when there is no GPU), then compares every exit's accuracy
on the test split. Writes ``benchmarks/results/distributed_parity.json``.

    python benchmarks/distributed_parity.py --data ../shared/data/sst2 --limit 2000 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with train/dev/test .tsv")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--limit", type=int, default=2000, help="first N training phrases")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", default="one,many", help="one, many or both: a second seed of one process "
                        "alone measures the seed-to-seed spread the difference is judged against")
    parser.add_argument("--output", default="runs/distributed_parity")
    parser.add_argument("--results", default="benchmarks/results/distributed_parity.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from layerexit.data import Encoded, load_data
    from layerexit.evaluation.cache import collect_logits
    from layerexit.evaluation.simulate import per_layer_accuracy
    from layerexit.model import MultiExitModel

    out = Path(args.output)
    common = ["train", "--model", args.model, "--data", args.data, "--split", "train", "--eval-split", "none",
              "--limit", str(args.limit), "--epochs", str(args.epochs), "--max-length", str(args.max_length), "--seed", str(args.seed)]
    per_process = args.global_batch_size // args.processes
    runs = {
        "1 process": [sys.executable, "-m", "layerexit.cli.main", *common, "--batch-size",
                      str(args.global_batch_size), "--output", str(out / "one")],
        f"{args.processes} processes": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                        str(args.processes), "--master_addr", "127.0.0.1", "--master_port",
                                        str(free_port()), "-m", "layerexit.cli.main", *common, "--batch-size",
                                        str(per_process), "--output", str(out / "many")],
    }
    wanted = args.runs.split(",")
    runs = {name: command for (key, (name, command)) in zip(("one", "many"), runs.items()) if key in wanted}
    test = load_data(args.data, "test")
    results = {"load_at_start": loadavg(), "recipe": vars(args), "runs": {}}
    for name, command in runs.items():
        started = time.monotonic()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        subprocess.run(command, check=True, env=env)
        folder = Path(command[command.index("--output") + 1]) / "final"
        model = MultiExitModel.from_pretrained(folder)
        encoded = Encoded(test, AutoTokenizer.from_pretrained(folder), model.config.max_length)
        cache = collect_logits(model, encoded, 128, progress=False)
        accs = per_layer_accuracy(cache.logits, cache.labels)
        results["runs"][name] = {"command": shlex.join(command), "wall_s": round(time.monotonic() - started, 1),
                                 "per_exit_accuracy": accs, "final_accuracy": accs[-1],
                                 "mean_exit_accuracy": sum(accs) / len(accs), "load_after": loadavg()}
        print(name, " ".join(f"{a:.4f}" for a in accs))
    if len(results["runs"]) == 2:
        one, many = results["runs"].values()
        results["final_accuracy_difference_points"] = 100 * (many["final_accuracy"] - one["final_accuracy"])
        results["max_exit_difference_points"] = 100 * max(
            abs(a - b) for a, b in zip(many["per_exit_accuracy"], one["per_exit_accuracy"]))
    results["torch"] = torch.__version__
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k.endswith("points")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data parallel training gives the accuracy of one process at the same global batch.

Trains the same recipe twice with the real CLI: one process with ``--batch-size B`` and ``torchrun`` with two
processes of ``--batch-size B/2`` (gloo on the CPU when there is no GPU), then compares every exit's accuracy
on the test split. ``--seeds`` repeats both for several seeds, so the difference can be read against the
seed-to-seed spread of one process. Results are written after every run (a partial file survives an
interruption), by default to ``benchmarks/results/distributed_parity.json``.

    python benchmarks/distributed_parity.py --data data/sst2 --limit 2000 --epochs 1
    python benchmarks/distributed_parity.py --data data/sst2 --limit 2000 --epochs 1 --seeds 42,43,44 \
        --results benchmarks/results/distributed_parity_seeds.json
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
    parser.add_argument("--seeds", default="42", help="comma-separated seeds; each runs every kind in --runs")
    parser.add_argument("--runs", default="many,one", help="which kinds, in this order: one (one process), "
                        "many (--processes processes), or both")
    parser.add_argument("--output", default="runs/distributed_parity")
    parser.add_argument("--results", default="benchmarks/results/distributed_parity.json")
    parser.add_argument("--append", action="store_true", help="add to the runs already in --results (same recipe) "
                        "and skip those done, so each run can be started on its own (e.g. one lock hold each)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from layerexit.data import Encoded, load_data
    from layerexit.evaluation.cache import collect_logits
    from layerexit.evaluation.simulate import per_layer_accuracy
    from layerexit.model import MultiExitModel

    out = Path(args.output)
    per_process = args.global_batch_size // args.processes
    test = load_data(args.data, "test")
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_at_start": loadavg(),
               "recipe": vars(args), "torch": torch.__version__, "runs": {}}
    if args.append and Path(args.results).is_file():
        results = json.loads(Path(args.results).read_text())
        same = ("data", "model", "limit", "epochs", "global_batch_size", "max_length", "processes")
        if any(results["recipe"][k] != getattr(args, k) for k in same):
            parser.error(f"--append: {args.results} holds another recipe ({results['recipe']})")
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        common = ["train", "--model", args.model, "--data", args.data, "--split", "train", "--eval-split", "none",
                  "--limit", str(args.limit), "--epochs", str(args.epochs), "--max-length", str(args.max_length),
                  "--seed", str(seed), "--no-resume"]
        commands = {
            "one": [sys.executable, "-m", "layerexit.cli.main", *common, "--batch-size", str(args.global_batch_size),
                    "--output", str(out / f"one-{seed}")],
            "many": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                     "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "layerexit.cli.main",
                     *common, "--batch-size", str(per_process), "--output", str(out / f"many-{seed}")],
        }
        for kind in args.runs.split(","):
            command = commands[kind]
            name = f"{1 if kind == 'one' else args.processes} process{'es' if kind == 'many' else ''}, seed {seed}"
            if name in results["runs"]:
                print(f"{name}: already in {args.results}")
                continue
            started, load_before = time.monotonic(), loadavg()
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            subprocess.run(command, check=True, env=env)
            folder = Path(command[command.index("--output") + 1]) / "final"
            model = MultiExitModel.from_pretrained(folder)
            encoded = Encoded(test, AutoTokenizer.from_pretrained(folder), model.config.max_length)
            cache = collect_logits(model, encoded, 128, progress=False)
            accs = per_layer_accuracy(cache.logits, cache.labels)
            results["runs"][name] = {"kind": kind, "seed": seed, "command": shlex.join(command),
                                     "wall_s": round(time.monotonic() - started, 1), "per_exit_accuracy": accs,
                                     "final_accuracy": accs[-1], "mean_exit_accuracy": sum(accs) / len(accs),
                                     "load_before": load_before, "load_after": loadavg()}
            print(name, " ".join(f"{a:.4f}" for a in accs), flush=True)
            results["summary"] = summary(results["runs"])
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results.get("summary"), indent=2))
    return 0


def _spread(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"values": values, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def summary(runs: dict) -> dict:
    """Final-exit accuracy (points) per kind across seeds, and the paired difference at each seed."""
    out = {}
    for kind in ("one", "many"):
        finals = [100 * r["final_accuracy"] for r in runs.values() if r["kind"] == kind]
        if finals:
            out[f"{kind}_final_accuracy_points"] = _spread(finals)
    by_seed = {}
    for r in runs.values():
        by_seed.setdefault(r["seed"], {})[r["kind"]] = r
    paired = {seed: pair for seed, pair in by_seed.items() if len(pair) == 2}
    if paired:
        out["final_difference_points_by_seed"] = {
            str(seed): 100 * (p["many"]["final_accuracy"] - p["one"]["final_accuracy"]) for seed, p in paired.items()}
        out["max_exit_difference_points_by_seed"] = {
            str(seed): 100 * max(abs(a - b) for a, b in zip(p["many"]["per_exit_accuracy"],
                                                            p["one"]["per_exit_accuracy"]))
            for seed, p in paired.items()}
    return out


if __name__ == "__main__":
    sys.exit(main())

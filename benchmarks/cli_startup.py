"""Start-up time of the command line: `layerexit --help`, `layerexit list` and an option refused by its check,
each in a fresh interpreter, optionally against another source tree (e.g. an older release) interleaved in the
same run, so both see the same machine load.

    python benchmarks/cli_startup.py --runs 5 --output benchmarks/results/cli_startup.json
    python benchmarks/cli_startup.py --compare /tmp/layerexit-old/src --runs 5     # old tree vs this one

Writes the wall-clock seconds of every run, their median and spread, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = {
    "--help": ["--help"],
    "list": ["list"],
    "evaluate --model /no/such/checkpoint (refused)": ["evaluate", "--model", "/no/such/checkpoint"],
    "train --warmup-ratio 5 (refused)": ["train", "--warmup-ratio", "5", "--output", "/dev/null/refused"],
}
#: commands that a compared (older) tree may accept and run for real (an older `train` trains with
#: --warmup-ratio 5): timed on this tree only
THIS_TREE_ONLY = {"train --warmup-ratio 5 (refused)"}


def time_once(src: str, argv: list[str]) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "layerexit.cli.main", *argv], env=env, capture_output=True)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compare", help="another source tree (its src/ folder), timed interleaved with this one")
    parser.add_argument("--output", help="JSON file to write")
    args = parser.parse_args()
    trees = {"this tree": str(SRC)} | ({"compared tree": args.compare} if args.compare else {})
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    times: dict = {tree: {name: [] for name in COMMANDS} for tree in trees}
    codes: dict = {tree: {} for tree in trees}
    for _ in range(args.runs):  # interleaved: every tree and command once per round
        for name, argv in COMMANDS.items():
            for tree, src in trees.items():
                if tree != "this tree" and name in THIS_TREE_ONLY:
                    continue
                seconds, code = time_once(src, argv)
                times[tree][name].append(round(seconds, 3))
                codes[tree][name] = code
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    summary = {tree: {name: {"median_s": round(statistics.median(v), 3), "min_s": min(v), "max_s": max(v),
                             "runs_s": v, "exit_code": codes[tree][name]} for name, v in per.items() if v}
               for tree, per in times.items()}
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "trees": trees, "results": summary,
               "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
               "python": platform.python_version(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    text = json.dumps(payload, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()

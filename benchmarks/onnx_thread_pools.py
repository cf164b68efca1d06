"""ONNX Runtime thread-pool settings for per-layer sessions: why the ``onnx`` backends share one pool.

Runs the saved per-layer graphs of a checkpoint (``CHECKPOINT/optimized/onnx/``, written by
``model.save_optimized``) as the engine does: one session call per layer, a small PyTorch exit head in
between. Each setting runs in a fresh interpreter, because ONNX Runtime's process-wide pool, once made,
cannot be undone. Settings: a pool per session with ONNX Runtime's default spinning (``per-session-spin``),
per-session pools without spinning (``thread_pool="session"``), and the shared process-wide pool
(``thread_pool="shared"``); plus one thread and no pool (``single-thread``) for reference.

    .venv/bin/python benchmarks/onnx_thread_pools.py --optimized runs/sst2/best/optimized/onnx
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("per-session-spin", "per-session-nospin", "shared", "single-thread")


def measure(folder: Path, setting: str, batch: int, length: int, threads: int, repeats: int) -> list[float]:
    """Milliseconds per sentence for one pass through every layer, ``repeats`` times (in this process)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    torch.set_num_threads(threads)
    files = sorted(folder.glob("layer_*.onnx"), key=lambda p: int(p.stem.split("_")[1]))
    if setting == "shared":
        ort.set_global_thread_pool_sizes(threads, 1)
    sessions = []
    for path in files:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if setting == "shared":
            options.use_per_session_threads = False
        else:
            options.intra_op_num_threads = 1 if setting == "single-thread" else threads
            options.inter_op_num_threads = 1
        if setting == "per-session-nospin":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
    hidden_size = sessions[0].get_inputs()[0].shape[-1]
    generator = np.random.default_rng(0)
    hidden = generator.standard_normal((batch, length, hidden_size)).astype(np.float32)  # (B, T, H)
    mask = np.ones((batch, length), dtype=np.int64)  # (B, T)
    head = torch.nn.Linear(hidden_size, 2)
    calls = max(1, 64 // batch)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for _ in range(calls):
            h = hidden
            for session in sessions:
                h = session.run(None, {"hidden": h, "mask": mask})[0]  # (B, T, H)
                with torch.inference_mode():  # the exit head and rule the engine runs between layers
                    head(torch.from_numpy(h).mean(1)).softmax(-1).amax(-1)
        times.append((time.perf_counter() - start) * 1000 / (calls * batch))
    return times[1:]  # the first pass warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimized", required=True, help="a saved optimized/onnx/ folder (layer_<i>.onnx)")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--length", type=int, default=25, help="tokens per row (SST-2 validation: ~25 on average)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all settings, interleaved")
    parser.add_argument("--output", default="benchmarks/results/onnx_thread_pools.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one setting in this fresh process: print its times as JSON
        setting, batch = args.child.split(":")
        print(json.dumps(measure(Path(args.optimized), setting, int(batch), args.length, args.threads, args.repeats)))
        return
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    results = {}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        runs = {s: [] for s in SETTINGS}
        for _ in range(args.rounds):
            for setting in SETTINGS:
                out = subprocess.run([sys.executable, __file__, "--optimized", args.optimized, "--child",
                                      f"{setting}:{batch}", "--length", str(args.length), "--threads",
                                      str(args.threads), "--repeats", str(args.repeats)],
                                     capture_output=True, text=True, check=True)
                runs[setting] += json.loads(out.stdout.strip().splitlines()[-1])
        results[str(batch)] = {s: {"median_ms_per_sentence": statistics.median(v), "min": min(v), "max": max(v),
                                   "values": v} for s, v in runs.items()}
        print(f"batch {batch}: " + ", ".join(f"{s} {statistics.median(v):.2f} ms" for s, v in runs.items()))
    payload = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "optimized": args.optimized,
               "length": args.length, "threads": args.threads, "loadavg_before": load_before,
               "loadavg_after": Path("/proc/loadavg").read_text().split()[:3], "results": results}
    from layerexit.io import write_json_atomic

    write_json_atomic(args.output, payload)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

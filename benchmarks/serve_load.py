"""Serving under load: open-loop Poisson traffic on 127.0.0.1 against `layerexit serve` with each scheduler.

For each server (``layer`` with the ``largest`` and ``deepest`` policies, ``batch`` and ``none`` with max-prob at
its operating point, and ``batch`` running the full model with the rule that never exits), all started at
once and driven in turn at each rate of a rising ladder (interleaved, so that background load hits them alike):
throughput, p50/p95/p99 latency (from each request's scheduled send time, so a late client does not hide
queueing), errors, and the highest offered rate each sustains (p99 within the SLO, <= 1% errors, >= 95% of the
requests answered). A server leaves the ladder after two rates it does not sustain. Also: the engine's batch-1
latency in this process, agreement of every server's answers with ``model.early_exit`` offline, the padding
cost of re-padding in layer steps (from /metrics), and the budget-shift experiment: an online ``--budget``
server fed packaged movie snippets then SST-2 sentences, every 200-request window's cost against the budget.

Bounded: at most ``--max-requests`` per rate, ``--seconds`` of arrivals per rate, 10 s per request; every
server is stopped at the end. Traffic goes to 127.0.0.1 only.

    flock /tmp/layerexit-heavy.lock .venv/bin/python benchmarks/serve_load.py --model runs/sst2-minilm/best \\
        --data data/sst2 --calibration runs/sst2-minilm/serving-calibration
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx2
import torch
from transformers import AutoTokenizer

from layerexit.data import Encoded, load_data
from layerexit.evaluation.cache import collect_logits
from layerexit.evaluation.evaluate import sweep
from layerexit.evaluation.metrics import operating_point
from layerexit.evaluation.simulate import per_layer_accuracy
from layerexit.io import write_json_atomic
from layerexit.model import MultiExitModel
from layerexit.rules import MaxProb, make_rule
from layerexit.serving import Engine
from layerexit.serving.process import ServerProcess


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def arrivals(rate: float, seconds: float, cap: int, seed: int) -> list[float]:
    rng, t, times = random.Random(seed), 0.0, []
    while len(times) < cap:
        t += rng.expovariate(rate)
        if t > seconds:
            break
        times.append(t)
    return times


async def drive(url: str, texts: list[str], order: list[int], times: list[float], timeout: float = 10.0) -> list[dict]:
    """Send ``texts[order[i]]`` at ``times[i]`` (open loop); one record per request."""
    loop = asyncio.get_running_loop()
    limits = httpx2.Limits(max_connections=1024, max_keepalive_connections=1024)
    records: list[dict] = []
    async with httpx2.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        start = loop.time() + 0.1

        async def one(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            scheduled = start + at
            record = {"index": order[i], "scheduled": at}
            try:
                response = await client.post("/predict", json={"inputs": texts[order[i]]})
                record["status"] = response.status_code
                if response.status_code == 200:
                    best = response.json()[0]
                    record.update(label=best["label"], exit_layer=best["exit_layer"])
            except httpx2.HTTPError as err:
                record["status"] = type(err).__name__
            record["latency"] = loop.time() - scheduled
            record["done"] = loop.time() - start
            records.append(record)

        await asyncio.gather(*(one(i, at) for i, at in enumerate(times)))
    return records


def summarize(records: list[dict], rate: float, seconds: float, slo: float) -> dict:
    ok = [r for r in records if r["status"] == 200]
    lat = sorted(r["latency"] for r in ok)
    q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000) if lat else (lambda p: float("nan"))
    span = max((r["done"] for r in ok), default=seconds)
    errors = len(records) - len(ok)
    out = {"offered_rate": rate, "sent": len(records), "answered": len(ok), "errors": errors,
           "throughput": len(ok) / max(span, 1e-9), "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99),
           "mean_exit_layer": statistics.fmean(r["exit_layer"] for r in ok) if ok else None}
    out["sustained"] = bool(ok) and out["p99_ms"] <= slo and errors <= 0.01 * len(records) \
        and len(ok) >= 0.95 * len(records)
    return out


def engine_batch1_ms(model, tokenizer, texts: list[str], rule, n: int = 200) -> float:
    """Median in-process latency of one text alone through the engine (tokenizing included), 1 thread."""
    engine = Engine(model, tokenizer)
    times = []
    for text in (texts * 2)[: n + 20]:
        t0 = time.perf_counter()
        (ids, types), = engine.encode([text])
        engine.run([engine.new_row(ids, types, rule)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[20:]) * 1000


def offline_answers(model, tokenizer, texts: list[str], rule) -> list[tuple[str, int]]:
    out = []
    for start in range(0, len(texts), 64):
        tok = tokenizer(texts[start : start + 64], padding=True, truncation=True,
                        max_length=model.config.max_length, return_tensors="pt")
        result = model.early_exit(tok["input_ids"], tok["attention_mask"], tok.get("token_type_ids"), rule=rule)
        out += [(model.config.label_names[int(p)], int(e)) for p, e in zip(result.predictions, result.exit_layer)]
    return out


def agreement(records: list[dict], expected: list[tuple[str, int]]) -> dict:
    ok = [r for r in records if r["status"] == 200]
    return {"answers": len(ok),
            "same_label": sum(r["label"] == expected[r["index"]][0] for r in ok) / max(1, len(ok)),
            "same_exit_layer": sum(r["exit_layer"] == expected[r["index"]][1] for r in ok) / max(1, len(ok))}


def plot_load(results: dict, slo: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in results.items():
        rates = [r["offered_rate"] for r in runs]
        axes[0].plot(rates, [r["p99_ms"] for r in runs], marker="o", label=name)
        axes[1].plot(rates, [r["p50_ms"] for r in runs], marker="o", label=name)
    for ax, what in zip(axes, ("p99", "p50")):
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_ylabel(f"{what} latency (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].axhline(slo, color="grey", linestyle="--", label=f"SLO {slo:.0f} ms")
    axes[0].legend(fontsize=7)
    fig.suptitle("layerexit serve on 127.0.0.1: latency against offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_budget(window_costs: list[float], fixed_costs: list[float], budget: float, shift_at: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(200, 200 + len(window_costs)), window_costs, label="online controller (served)")
    ax.plot(range(200, 200 + len(fixed_costs)), fixed_costs, label="offline threshold alone (same stream)",
            alpha=0.7)
    ax.axhline(budget, color="black", label=f"budget {budget}")
    ax.axhspan(budget * 0.95, budget * 1.05, color="grey", alpha=0.2, label="±5%")
    ax.axvline(shift_at, color="red", linestyle=":", label="shift: snippets → SST-2 sentences")
    ax.set_xlabel("request (completion order)")
    ax.set_ylabel("cost of the last 200 requests (fraction of layers)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def windows(costs: list[float], size: int = 200) -> list[float]:
    values = torch.tensor(costs, dtype=torch.float64)
    return values.unfold(0, size, 1).mean(dim=1).tolist() if len(costs) >= size else []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="folder with <split>.tsv (SST-2)")
    p.add_argument("--split", default="test")
    p.add_argument("--calibration", help="folder from `layerexit calibrate` on a validation split (budget run)")
    p.add_argument("--threshold", type=float, help="max-prob threshold (default: its operating point on --split)")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--rates", default="10,20,40,60,80,110,150,200,260,330")
    p.add_argument("--seconds", type=float, default=5.0, help="arrivals per rate")
    p.add_argument("--max-requests", type=int, default=2000, help="cap per rate")
    p.add_argument("--slo-ms", type=float, default=100.0, help="p99 latency SLO")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per server")
    p.add_argument("--servers", default="layer-largest,layer-deepest,batch,none,full-batch")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--budget-rate", type=float, default=30.0, help="Poisson rate of the budget stream")
    p.add_argument("--skip-budget", action="store_true")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--output", default="benchmarks/results/serve_load.json")
    args = p.parse_args()
    started = time.time()
    load_start = open("/proc/loadavg").read().strip() if os.path.exists("/proc/loadavg") else None
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    output = Path(args.output)
    result: dict = {"command": shlex.join([sys.executable, *sys.argv]), "date": datetime.now(timezone.utc).isoformat(),
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "loadavg_start": load_start, "slo_p99_ms": args.slo_ms, "threads_per_server": args.threads}
    model = MultiExitModel.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_data(args.data, args.split)
    texts = list(data.texts)
    threshold = args.threshold
    if threshold is None:
        cache = collect_logits(model, Encoded(data, tokenizer, model.config.max_length), progress=False)
        full = per_layer_accuracy(cache.logits, cache.labels)[-1]
        point = operating_point(sweep(cache, ["maxprob"])["maxprob"], full, args.tolerance)
        threshold = float(point["params"]["threshold"])
        result["operating_point"] = {"rule": "maxprob", "threshold": threshold, "accuracy": point["accuracy"],
                                     "full_accuracy": full, "avg_layers": point.get("avg_layers"),
                                     "chosen_on": args.split, "tolerance": args.tolerance}
    rule = MaxProb(threshold)
    log(f"max-prob threshold {threshold}")
    result["engine_batch1_ms"] = {"early_exit": engine_batch1_ms(model, tokenizer, texts, rule),
                                  "full": engine_batch1_ms(model, tokenizer, texts, make_rule("full"))}
    log(f"engine batch-1 latency {result['engine_batch1_ms']}")
    expected = {"early": offline_answers(model, tokenizer, texts, rule),
                "full": offline_answers(model, tokenizer, texts, make_rule("full"))}
    common = ["--model", args.model, "--threads", str(args.threads), "--max-batch", str(args.max_batch),
              "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "4096"]
    early = ["--rule", "maxprob", "--threshold", str(threshold)]
    specs = {"layer-largest": early + ["--scheduler", "layer", "--policy", "largest"],
             "layer-deepest": early + ["--scheduler", "layer", "--policy", "deepest"],
             "batch": early + ["--scheduler", "batch"], "none": early + ["--scheduler", "none"],
             "full-batch": ["--rule", "full", "--scheduler", "batch"]}
    if not args.skip_load:
        servers = {}
        try:
            for name in args.servers.split(","):
                servers[name] = ServerProcess(*common, *specs[name], name=name, wait=False)
                servers[name].wait()  # one at a time: startups do not compete
            log(f"servers up: {', '.join(servers)}")
            for server in servers.values():  # warm-up
                asyncio.run(drive(server.url, texts, list(range(20)), [0.02 * i for i in range(20)]))
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            misses = {name: 0 for name in servers}
            agree: dict[str, list] = {name: [] for name in servers}
            rng = random.Random(0)
            for step, rate in enumerate(float(r) for r in args.rates.split(",")):
                active = [n for n in servers if misses[n] < 2]
                if not active:
                    break
                times = arrivals(rate, args.seconds, args.max_requests, seed=step)
                order = [rng.randrange(len(texts)) for _ in times]
                for name in active:
                    records = asyncio.run(drive(servers[name].url, texts, order, times))
                    summary = summarize(records, rate, args.seconds, args.slo_ms)
                    summary["loadavg"] = open("/proc/loadavg").read().split()[0]
                    runs[name].append(summary)
                    agree[name] += records
                    misses[name] = 0 if summary["sustained"] else misses[name] + 1
                    log(f"{name:>14} @ {rate:5.0f}/s: {summary['throughput']:6.1f}/s p50 {summary['p50_ms']:7.1f} "
                        f"p99 {summary['p99_ms']:7.1f} ms errors {summary['errors']} "
                        f"{'ok' if summary['sustained'] else 'MISS'}")
            best = {name: max([r["offered_rate"] for r in rs if r["sustained"]], default=0.0)
                    for name, rs in runs.items()}
            result["load"] = {"runs": runs, "highest_sustained_rate": best,
                              "agreement_with_offline": {n: agreement(agree[n], expected["full" if n == "full-batch"
                                                                                         else "early"])
                                                         for n in servers}}
            padding = {}
            for name, server in servers.items():
                m = server.metrics()
                padding[name] = {"padded_tokens": m.get("layerexit_padded_tokens_total"),
                                 "real_tokens": m.get("layerexit_real_tokens_total"),
                                 "layer_steps": m.get("layerexit_layer_steps_total")}
                padding[name]["padding_fraction"] = padding[name]["padded_tokens"] / max(
                    1.0, padding[name]["padded_tokens"] + padding[name]["real_tokens"])
            result["load"]["padding"] = padding
            low = {n: runs[n][0]["p50_ms"] for n in runs if runs[n]}
            ratios = {}
            if best.get("full-batch"):
                ratios["layer_vs_full_batch"] = best.get("layer-largest", 0) / best["full-batch"]
            if best.get("batch"):
                for name in ("layer-largest", "layer-deepest"):
                    if name in best:
                        ratios[f"{name}_vs_batch"] = best[name] / best["batch"]
                ratios["layer_vs_batch"] = ratios.get("layer-largest_vs_batch", 0.0)
            if "layer-largest" in low:
                ratios["layer_low_load_p50_vs_engine_batch1"] = low["layer-largest"] / result["engine_batch1_ms"][
                    "early_exit"]
                if "none" in low:
                    ratios["layer_low_load_p50_vs_none_p50"] = low["layer-largest"] / low["none"]
            result["load"]["ratios"] = ratios
            result["load"]["targets"] = {
                "layer >= 1.6x full-model batch": ratios.get("layer_vs_full_batch", 0) >= 1.6,
                "layer >= 1.2x early-exit batch": ratios.get("layer_vs_batch", 0) >= 1.2,
                "low-load p50 of layer <= 1.1x engine batch-1": ratios.get("layer_low_load_p50_vs_engine_batch1",
                                                                            9) <= 1.1}
            plot_load(runs, args.slo_ms, output.with_name(output.stem + "_latency.png"))
        finally:
            for server in servers.values():
                server.stop()
    if not args.skip_budget and args.calibration:
        result["budget_shift"] = budget_shift(args, model, tokenizer, texts, output)
    result["loadavg_end"] = open("/proc/loadavg").read().strip()
    result["wall_s"] = time.time() - started
    write_json_atomic(output, result)
    log(f"wrote {output} ({result['wall_s']:.0f} s)")
    return 0


def budget_shift(args, model, tokenizer, sst2_texts: list[str], output: Path) -> dict:
    """Online --budget on packaged movie snippets, then SST-2 sentences; windows of 200 in completion order."""
    from layerexit.serving.budget import BudgetController
    from layerexit.evaluation.cache import LogitCache

    snippets = list(load_data("rotten-tomatoes", "test").texts)
    stream = snippets + sst2_texts
    server = ServerProcess("--model", args.model, "--threads", str(args.threads), "--calibration", args.calibration,
                           "--budget", str(args.budget), "--scheduler", "layer", name="budget", wait=False)
    try:
        server.wait()
        times = arrivals(args.budget_rate, 10_000, len(stream), seed=99)
        records = asyncio.run(drive(server.url, stream, list(range(len(stream))), times))
        info = httpx2.get(server.url + "/info").json()["rule"]["budget"]
    finally:
        server.stop()
    records.sort(key=lambda r: r["done"])
    ok = [r for r in records if r["status"] == 200]
    layers = model.config.num_layers
    costs = [r["exit_layer"] / layers for r in ok]
    served = windows(costs)
    after = served[200:] if len(served) > 200 else []  # windows after the first 200 requests
    worst = max((abs(c - args.budget) / args.budget for c in after), default=None)
    # the same stream under the starting threshold alone (no feedback), offline
    start = BudgetController.from_cache(args.budget, LogitCache.load(Path(args.calibration) / "fit_logits.pt"))
    fixed_rule = start.rule()
    fixed = offline_answers(model, tokenizer, stream, fixed_rule)
    fixed_windows = windows([e / layers for _, e in fixed])
    fixed_after = fixed_windows[200:]
    plot_budget(served, fixed_windows, args.budget, len(snippets), output.with_name(output.stem + "_budget.png"))
    return {"budget": args.budget, "rate": args.budget_rate, "stream": f"{len(snippets)} packaged movie snippets "
            f"(rotten-tomatoes test) then {len(sst2_texts)} SST-2 {args.split} sentences",
            "controller_at_end": info, "answered": len(ok), "errors": len(records) - len(ok),
            "error_kinds": sorted({str(r["status"]) for r in records if r["status"] != 200}),
            "mean_cost": sum(costs) / max(1, len(costs)),
            "worst_window_relative_error_after_200": worst,
            "windows_within_5pct": sum(abs(c - args.budget) <= 0.05 * args.budget for c in after) / max(1, len(after)),
            "fixed_threshold": {"threshold": start.start_threshold,
                                "worst_window_relative_error_after_200": max(
                                    (abs(c - args.budget) / args.budget for c in fixed_after), default=None),
                                "mean_cost": sum(e for _, e in fixed) / layers / len(fixed)},
            "target_met": worst is not None and worst <= 0.05}


if __name__ == "__main__":
    sys.exit(main())

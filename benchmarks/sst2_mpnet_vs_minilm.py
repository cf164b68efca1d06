"""Large model with early exit against small model in full, at equal cost, on GLUE SST-2 (PCEE's first claim).

- Large: the packaged 12-layer all-mpnet-base-v2 with an exit after every layer, trained here with the same
  recipe as ``benchmarks/sst2_minilm.py`` (first 8,000 training phrases, 2 epochs, batch 32, lr 5e-5, max length
  64, PABEE weighted loss, the checkpoint's own mean pooling), PCEE fitted on ``dev.tsv``.
- Small: the 6-layer MiniLM-L6 trained by ``benchmarks/sst2_minilm.py`` (``MINILM_RUN/model/best``) run in full:
  its backbone plus its last exit, no other exit computed.

Both are evaluated on GLUE SST-2 validation (``test.tsv``). "Equal cost" is matched two ways, neither of which
looks at test labels: (1) multiply-adds per row (``layerexit.evaluation.cost``, exit heads included, each row at
its own token count): the largest target δ whose simulated average multiply-adds on the test inputs stay within
MiniLM's; (2) measured wall clock: MPNet with PCEE at a few candidate targets and MiniLM in full, timed in this
process over the same sentences, interleaved round by round (median of rounds); the largest δ whose time stays
within MiniLM's. The budget rule (multiply-adds, fitted on dev to MiniLM's cost) is reported beside them.

    flock /tmp/layerexit-heavy.lock .venv/bin/python benchmarks/sst2_mpnet_vs_minilm.py --data data/sst2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from layerexit.data import Encoded, load_data
from layerexit.evaluation.benchmark import Batches, engine_forward, plain_forward
from layerexit.errors import LayerExitError
from layerexit.evaluation.cost import exit_costs, plain_cost, row_costs
from layerexit.evaluation.simulate import per_layer_accuracy, simulate
from layerexit.rules import PCEE, PCEEWS, Budget

from common import cached_logits, train_or_reuse

TARGETS = [round(0.50 + 0.005 * i, 3) for i in range(100)]  # 0.500 .. 0.995


def lengths(encoded: Encoded) -> torch.Tensor:
    return torch.tensor([len(ids) for ids in encoded.features["input_ids"]], dtype=torch.float64)


def time_variants(variants: dict, batches: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each variant over its batches; variants interleaved round by round (1 warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            for inputs in batches[name].inputs:
                fn(inputs)
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--minilm-run", default="runs/bench-sst2",
                        help="MiniLM run folder; trained here with the same recipe if MINILM_RUN/model/best is absent")
    parser.add_argument("--run-dir", default="runs/bench-sst2-mpnet")
    parser.add_argument("--train-examples", type=int, default=8000)
    parser.add_argument("--dev-examples", type=int, default=1000, help="dev examples for model selection")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fit-examples", type=int, default=None, help="dev examples PCEE is fitted on (all)")
    parser.add_argument("--num-bins", type=int, default=10)
    parser.add_argument("--batch-sizes", default="32,1")
    parser.add_argument("--batch1-examples", type=int, default=300, help="sentences timed at batch 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=5, help="PCEE targets timed around the cost match")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/sst2_mpnet_vs_minilm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    run_dir = Path(args.run_dir)
    mpnet, mp_tok = train_or_reuse("all-mpnet-base-v2", args.data, run_dir, args.train_examples, args.dev_examples,
                                   args.epochs)
    trained = time.perf_counter()
    # the small model, trained with the same recipe when its run folder has none
    minilm, mini_tok = train_or_reuse("all-MiniLM-L6-v2", args.data, args.minilm_run, args.train_examples,
                                      args.dev_examples, args.epochs)

    dev, test_data = load_data(args.data, "dev", limit=args.fit_examples), load_data(args.data, "test")
    mp_fit, _ = cached_logits(mpnet, mp_tok, dev, run_dir / "logits_dev.pt")
    mp_test, mp_enc = cached_logits(mpnet, mp_tok, test_data, run_dir / "logits_test.pt")
    mini_test, mini_enc = cached_logits(minilm, mini_tok, test_data, Path(args.minilm_run) / "logits_test.pt")
    labels = mp_test.labels
    assert torch.equal(labels, mini_test.labels)

    # --- multiply-adds per row, each row at its own token count -----------------------------------------------
    mp_costs = row_costs(mpnet, lengths(mp_enc))  # (N, 12) cumulative, heads included
    mini_full = float(torch.tensor([plain_cost(minilm, float(t)) for t in lengths(mini_enc)]).mean())
    mp_full = float(torch.tensor([plain_cost(mpnet, float(t)) for t in lengths(mp_enc)]).mean())
    mini_acc = per_layer_accuracy(mini_test.logits, labels)
    mp_acc = per_layer_accuracy(mp_test.logits, labels)

    pcee = PCEE(0.9, args.num_bins).fit(mp_fit)
    pcee_ws = PCEEWS(0.9, args.num_bins).fit(mp_fit)
    sweep = []
    for target in TARGETS:
        row = {"target": target}
        for name, rule in (("pcee", pcee), ("pcee-ws", pcee_ws)):
            sim = simulate(rule.with_target(target), mp_test.logits)
            macs = float(mp_costs.gather(1, (sim.exit_layer - 1).view(-1, 1)).mean())
            row[name] = {"accuracy": float((sim.predictions == labels).double().mean()),
                         "avg_layers": float(sim.exit_layer.double().mean()), "macs": macs}
        sweep.append(row)
    # (1) equal multiply-adds, chosen without test labels: the largest target within MiniLM's cost
    within = [r for r in sweep if r["pcee"]["macs"] <= mini_full]
    macs_match = within[-1] if within else None
    # the budget rule at MiniLM's cost, fitted on dev (costs at dev's mean token count; no test data used)
    dev_tokens = float(lengths(Encoded(dev, mp_tok, mpnet.config.max_length)).mean())
    dev_mini_tokens = float(lengths(Encoded(dev, mini_tok, minilm.config.max_length)).mean())
    mp_exit_costs = exit_costs(mpnet, dev_tokens)
    try:
        budget_rule = Budget(min(1.0, plain_cost(minilm, dev_mini_tokens) / mp_exit_costs[-1]), "macs",
                             mp_exit_costs).fit(mp_fit)
        sim = simulate(budget_rule, mp_test.logits)
        budget = {"asked_fraction": budget_rule.budget, "threshold": budget_rule.threshold_,
                  "accuracy": float((sim.predictions == labels).double().mean()),
                  "avg_layers": float(sim.exit_layer.double().mean()),
                  "macs": float(mp_costs.gather(1, (sim.exit_layer - 1).view(-1, 1)).mean())}
    except LayerExitError as err:  # a budget below one layer's cost: reported, not fatal
        budget = {"error": str(err)}

    # --- (2) measured wall clock -----------------------------------------------------------------------------
    index = sweep.index(macs_match) if macs_match else 0
    lo, hi = max(0, index - 2 * (args.candidates // 2)), min(len(sweep), index + 2 * (args.candidates // 2) + 1)
    candidates = [sweep[i]["target"] for i in range(lo, hi, 2)]
    timing = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        limit = args.batch1_examples if batch_size == 1 else None
        batches = {"minilm-full": Batches.build(mini_enc, batch_size, limit)}
        variants = {"minilm-full": lambda b: plain_forward(minilm, b)}
        for target in candidates:
            name = f"mpnet-pcee@{target}"
            batches[name] = Batches.build(mp_enc, batch_size, limit)
            variants[name] = lambda b, r=pcee.with_target(target): engine_forward(mpnet, b, r)
        seconds = time_variants(variants, batches, args.rounds)
        n = len(batches["minilm-full"].labels)
        entries = []
        for target in candidates:
            sim = simulate(pcee.with_target(target), mp_test.logits[:, :n])
            entries.append({"target": target, "seconds": seconds[f"mpnet-pcee@{target}"],
                            "accuracy": float((sim.predictions == labels[:n]).double().mean()),
                            "avg_layers": float(sim.exit_layer.double().mean())})
        mini_seconds = seconds["minilm-full"]
        fast = [e for e in entries if e["seconds"] <= mini_seconds]
        timing[str(batch_size)] = {
            "examples": n, "minilm_full_seconds": mini_seconds,
            "minilm_full_accuracy": float((mini_test.logits[-1, :n].argmax(-1) == labels[:n]).double().mean()),
            "mpnet_pcee": entries, "match": fast[-1] if fast else None,
        }

    payload = {
        "benchmark": "sst2_mpnet_vs_minilm", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "args": vars(args), "train_seconds": trained - started, "total_seconds": time.perf_counter() - started,
        "minilm": {"per_layer_accuracy": mini_acc, "full_accuracy": mini_acc[-1], "macs_full": mini_full},
        "mpnet": {"per_layer_accuracy": mp_acc, "full_accuracy": mp_acc[-1], "macs_full": mp_full,
                  "fit_split": mp_fit.split, "num_fit_examples": int(mp_fit.labels.numel())},
        "equal_macs": {"minilm_accuracy": mini_acc[-1], "minilm_macs": mini_full, "mpnet_pcee": macs_match,
                       "mpnet_budget_rule": budget},
        "equal_wall_clock": timing, "sweep": sweep,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")

    print(f"MiniLM-L6 full: accuracy {100 * mini_acc[-1]:.1f}%, {mini_full / 1e6:.1f} M multiply-adds per sentence")
    print(f"MPNet-12 full:  accuracy {100 * mp_acc[-1]:.1f}%, {mp_full / 1e6:.1f} M; per layer "
          + " ".join(f"{100 * a:.1f}" for a in mp_acc))
    if macs_match:
        p = macs_match["pcee"]
        print(f"equal multiply-adds: MPNet + PCEE at δ={macs_match['target']}: accuracy {100 * p['accuracy']:.1f}%, "
              f"{p['avg_layers']:.2f} layers, {p['macs'] / 1e6:.1f} M (MiniLM {100 * mini_acc[-1]:.1f}%)")
    else:
        print("equal multiply-adds: no PCEE target keeps MPNet within MiniLM's multiply-adds")
    print(f"budget rule at MiniLM's cost: {budget}")
    for batch_size, t in timing.items():
        print(f"batch {batch_size}: MiniLM full {t['minilm_full_seconds']:.2f} s ({100 * t['minilm_full_accuracy']:.1f}%)")
        for e in t["mpnet_pcee"]:
            print(f"   MPNet PCEE δ={e['target']}: {e['seconds']:.2f} s, {100 * e['accuracy']:.1f}%, "
                  f"{e['avg_layers']:.2f} layers")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

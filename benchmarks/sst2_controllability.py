"""Accuracy control benchmark: accuracy control (PCEE, PCEE-WS) and budgets on GLUE SST-2 with MiniLM-L6 exits.

Reuses the multi-exit MiniLM-L6 trained by ``benchmarks/sst2_minilm.py`` (``RUN_DIR/model/best``). Every exit's
logits are cached once on the dev split (``dev.tsv``, a 10% re-split of the GLUE training phrases: the fitting
split) and on GLUE SST-2 validation (``test.tsv``, 872 sentences: the reporting split). On the dev cache the
rules are fitted: PCEE and PCEE-WS tables, per-exit temperatures, budget thresholds. On the test cache, for
every target accuracy δ, the accuracy reached by PCEE, PCEE-WS, max-prob at δ and temperature-scaled max-prob
at δ is recorded with the layers each used; for every budget the cost reached is compared with the budget
asked (in layers and in multiply-adds, exit heads included). Everything here is simulated over cached logits
(exact accuracies and exit layers), except the optional ``--measure`` runs, which put PCEE at one target
through the real layer-skipping engine with a wall clock.

Writes ``benchmarks/results/sst2_controllability.json``, plots into ``RUN_DIR/controllability/`` and adds the
``controllability`` entry and the ``pcee`` / ``pcee-ws`` curves to ``RUN_DIR/eval/results.json`` when it exists.

    flock /tmp/layerexit-heavy.lock .venv/bin/python benchmarks/sst2_controllability.py --data data/sst2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoTokenizer

from layerexit.data import load_data
from layerexit.evaluation.cache import LogitCache
from layerexit.evaluation.calibration_plots import (plot_budgets, plot_controllability, plot_reliability,
                                                    plot_reliability_exit)
from layerexit.evaluation.controllability import DEFAULT_TARGETS, controllability, fit_rules, at_target
from layerexit.evaluation.cost import exit_costs
from layerexit.io import write_json_atomic
from layerexit.model import MultiExitModel

from common import cached_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with dev.tsv and test.tsv")
    parser.add_argument("--run-dir", default="runs/bench-sst2")
    parser.add_argument("--fit-split", default="dev")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--fit-limit", type=int, default=None, help="use only the first N fitting examples")
    parser.add_argument("--num-bins", type=int, default=10)
    parser.add_argument("--binning", default="width")
    parser.add_argument("--smoothing", default="neighbour")
    parser.add_argument("--measure", type=float, default=None, help="also time PCEE at this target in the engine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/sst2_controllability.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    run_dir = Path(args.run_dir)
    best = run_dir / "model" / "best"
    model, tokenizer = MultiExitModel.from_pretrained(best), AutoTokenizer.from_pretrained(best)
    fit, fit_encoded = cached_logits(model, tokenizer, load_data(args.data, args.fit_split, limit=args.fit_limit),
                                     run_dir / f"logits_{args.fit_split}.pt")
    test, test_encoded = cached_logits(model, tokenizer, load_data(args.data, args.eval_split),
                                       run_dir / f"logits_{args.eval_split}.pt")
    fit_tokens = sum(len(ids) for ids in fit_encoded.features["input_ids"]) / len(fit_encoded)
    test_tokens = sum(len(ids) for ids in test_encoded.features["input_ids"]) / len(test_encoded)
    macs = exit_costs(model, fit_tokens)  # cumulative multiply-adds at the fitting split's mean length

    out = controllability(fit, test, DEFAULT_TARGETS, None, args.num_bins, args.binning, args.smoothing, macs)
    report = out["controllability"]
    report["mean_tokens"] = {"fit": fit_tokens, "eval": test_tokens}
    report["macs_per_exit_at_fit_length"] = macs

    # in-distribution check: the dev split cut in two halves (seeded), rules fitted on one, evaluated on the other;
    # separates what the rules do from the shift between dev phrases and test sentences
    order = torch.randperm(fit.labels.numel(), generator=torch.Generator().manual_seed(0))
    half_a, half_b = order[: len(order) // 2], order[len(order) // 2 :]
    dev_a = LogitCache(fit.logits[:, half_a], fit.labels[half_a], split=f"{args.fit_split}-a")
    dev_b = LogitCache(fit.logits[:, half_b], fit.labels[half_b], split=f"{args.fit_split}-b")
    halves = controllability(dev_a, dev_b, DEFAULT_TARGETS, None, args.num_bins, args.binning, args.smoothing, macs)
    report["dev_halves_check"] = {
        "target_summary": halves["controllability"]["target_accuracy"]["summary"],
        "achievable_range": halves["controllability"]["target_accuracy"]["achievable_range"],
        "budget_summary": {u: b["summary"] for u, b in halves["controllability"]["budgets"].items()},
        "budget_rows": halves["controllability"]["budgets"]["layers"]["rows"],
    }

    measured = None
    if args.measure is not None:
        from layerexit.evaluation.benchmark import speed_report

        rules = {name: at_target(rule, args.measure) for name, rule in fit_rules(fit, args.num_bins, args.binning,
                                                                               args.smoothing).items()
                 if name in ("pcee", "pcee-ws")}
        measured = []
        for batch_size in (1, 32):
            for entry in speed_report(model, test_encoded, rules, batch_size, rounds=3):
                entry.pop("exit_layers")
                measured.append(entry)
        report["measured"] = measured

    plots = run_dir / "controllability"
    plot_controllability(report, plots / "controllability.png")
    plot_budgets(report, plots / "budgets.png")
    plot_reliability(report["calibration"]["eval"], plots / "reliability_test.png",
                     f"reliability per exit on {args.eval_split} (temperatures fitted on {args.fit_split})")
    for row in report["calibration"]["eval"]:
        plot_reliability_exit(row, plots / "reliability" / f"exit_{row['exit']}.png")

    results_path = run_dir / "eval" / "results.json"
    if results_path.is_file():  # add to the evaluation's own results.json
        results = json.loads(results_path.read_text())
        results["controllability"] = report
        results.setdefault("curves", {}).update(out["curves"])
        write_json_atomic(results_path, results)

    sweep = report["target_accuracy"]
    summary = {
        "pcee_mean_abs_gap": sweep["summary"]["pcee"]["mean_abs_gap"],
        "pcee_ws_mean_abs_gap": sweep["summary"]["pcee-ws"]["mean_abs_gap"],
        "maxprob_mean_abs_gap": sweep["summary"]["maxprob"]["mean_abs_gap"],
        "maxprob_ts_mean_abs_gap": sweep["summary"]["maxprob-ts"]["mean_abs_gap"],
        "achievable_range": sweep["achievable_range"],
        "num_achievable_targets": sweep["summary"]["pcee"]["num_targets"],
        "budget_layers_max_abs_relative_error": report["budgets"]["layers"]["summary"]["max_abs_relative_error"],
        "budget_macs_max_abs_relative_error": report["budgets"]["macs"]["summary"]["max_abs_relative_error"],
        "budget_layers_mean_abs_relative_error": report["budgets"]["layers"]["summary"]["mean_abs_relative_error"],
        "dev_halves_pcee_mean_abs_gap": report["dev_halves_check"]["target_summary"]["pcee"]["mean_abs_gap"],
        "dev_halves_maxprob_mean_abs_gap": report["dev_halves_check"]["target_summary"]["maxprob"]["mean_abs_gap"],
        "dev_halves_budget_max_abs_relative_error":
            report["dev_halves_check"]["budget_summary"]["layers"]["max_abs_relative_error"],
    }
    for name, rows in sweep["rules"].items():  # the region users ask for: targets near the full model
        near = [abs(r["gap"]) for r in rows if r["achievable"] and r["target"] >= 0.80]
        summary[f"{name}_mean_abs_gap_targets_from_80"] = sum(near) / len(near) if near else None
    summary["target_pcee_gap_le_1pt"] = summary["pcee_mean_abs_gap"] <= 0.01
    summary["target_pcee_better_than_maxprob"] = summary["pcee_mean_abs_gap"] < summary["maxprob_mean_abs_gap"]
    summary["target_budgets_within_5pct"] = max(summary["budget_layers_max_abs_relative_error"],
                                                summary["budget_macs_max_abs_relative_error"]) <= 0.05
    payload = {
        "benchmark": "sst2_controllability", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "args": vars(args), "model": str(best), "seconds": time.perf_counter() - started,
        "summary": summary, "controllability": report,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")

    print(f"fitted on {args.fit_split} ({fit.labels.numel()}), evaluated on {args.eval_split} "
          f"({test.labels.numel()}); achievable targets {100 * sweep['achievable_range'][0]:.1f}-"
          f"{100 * sweep['achievable_range'][1]:.1f}%")
    print(f"{'target':>7} " + " ".join(f"{name:>18}" for name in sweep["rules"]))
    for i, target in enumerate(sweep["targets"]):
        cells = [f"{100 * rows[i]['accuracy']:6.1f}% {rows[i]['avg_layers']:4.2f}L" for rows in sweep["rules"].values()]
        mark = "*" if sweep["rules"]["pcee"][i]["achievable"] else " "
        print(f"{100 * target:6.0f}%{mark} " + " ".join(f"{c:>18}" for c in cells))
    for name, s in sweep["summary"].items():
        gap = s["mean_abs_gap"]
        print(f"{name:>11}: mean |target - achieved| over {s['num_targets']} achievable targets = "
              f"{100 * gap:.2f} pt; below target by > 1 pt at {s['below_target_by_more_than_1pt']}")
    for unit, b in report["budgets"].items():
        for row in b["rows"]:
            if "cost" in row:
                print(f"budget {unit:>6} asked {100 * row['asked']:5.1f}%: fit {100 * row['fit_cost']:5.1f}%, "
                      f"test {100 * row['cost']:5.1f}% ({100 * row['relative_error']:+.1f}% rel), acc "
                      f"{100 * row['accuracy']:.1f}%")
            else:
                print(f"budget {unit:>6} asked {100 * row['asked']:5.1f}%: {row['error']}")
    for entry in measured or []:
        print(f"measured {entry['rule']} batch {entry['batch_size']}: acc {100 * entry['accuracy']:.1f}%, "
              f"{entry['avg_layers']:.2f} layers, speed-up {entry['speedup_measured']:.2f}x (ideal "
              f"{entry['speedup_ideal']:.2f}x)")
    check = report["dev_halves_check"]
    print("in-distribution check (fit on one half of dev, evaluate on the other): mean |gap| "
          + ", ".join(f"{k} {100 * v['mean_abs_gap']:.2f} pt" for k, v in check["target_summary"].items())
          + f"; budgets max |rel error| {100 * check['budget_summary']['layers']['max_abs_relative_error']:.1f}%")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.output} and {plots}/")


if __name__ == "__main__":
    main()

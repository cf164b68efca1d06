"""ConsistentEE benchmark: ConsistentEE against the classic exit rules on MiniLM-L6 and SST-2.

Same backbone (packaged MiniLM-L6), same training data (the first N SST-2 training phrases), same training
budget in epochs over that data for every method:

- baseline: PABEE's weighted objective for ``stage1 + stage3`` epochs (3 by default); the classic rules
  (max-prob, margin, entropy, patience, patience + confidence, static) run on it;
- ConsistentEE: stage 1 (the weighted objective for 2 epochs, shared by all ConsistentEE runs), stage 2
  (policies only, on cached features) and stage 3 (1 epoch), for each alpha in the sweep and the ablations
  (no hardness, alpha = 0, greedy actions).

Choices are made on the dev split (``dev.tsv``, a part of GLUE's training set) and reported on GLUE SST-2
validation (``test.tsv``), then again on the packaged movie-review test split without any re-selection.
Writes ``benchmarks/results/sst2_consistentee.json`` and a report folder with the paper's analyses as plots.

    flock /tmp/layerexit-heavy.lock .venv/bin/python benchmarks/sst2_consistentee.py --data data/sst2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from layerexit.consistentee import ConsistentEEConfig, train_consistentee  # noqa: E402
from layerexit.data import Encoded, load_data  # noqa: E402
from layerexit.evaluation.cache import collect_logits  # noqa: E402
from layerexit.evaluation.evaluate import simulated_results  # noqa: E402
from layerexit.evaluation.metrics import area_under_curve, operating_point  # noqa: E402
from layerexit.evaluation.simulate import simulate  # noqa: E402
from layerexit.model import MultiExitModel  # noqa: E402
from layerexit.rules import DEFAULT_SWEEP, make_rule  # noqa: E402
from layerexit.training import TrainConfig  # noqa: E402
from layerexit.training.run import train_classifier  # noqa: E402

CLASSIC = [r for r in DEFAULT_SWEEP if r != "consistentee"]


def evaluate_model(model, tokenizer, datasets):
    """Logit caches of one model on every evaluation set."""
    return {name: collect_logits(model, Encoded(data, tokenizer, 64), progress=False)
            for name, data in datasets.items()}


def policy_point(cache, threshold):
    rule = make_rule("consistentee", threshold=threshold)
    return simulate(rule, cache.logits, signals=cache.signals).point(cache.labels, cache.num_layers,
                                                                     {"threshold": threshold})


def pick_on_dev(caches_by_run, tolerance):
    """(run, threshold) saving the most layers on dev with accuracy >= dev full - tolerance (own full model)."""
    best = None
    for run, caches in caches_by_run.items():
        dev = caches["dev"]
        full = float((dev.logits[-1].argmax(-1) == dev.labels).double().mean())
        for params in make_rule("consistentee").grid(dev.num_layers, 2):
            point = policy_point(dev, params["threshold"])
            if point["accuracy"] >= full - tolerance - 1e-9 and (best is None or point["saved_layers"] > best[2]):
                best = (run, params["threshold"], point["saved_layers"])
    return best


def per_layer_losses(cache):
    """(L, N) cross-entropy of every exit on every example."""
    num_layers, n, num_classes = cache.logits.shape
    return F.cross_entropy(cache.logits.reshape(-1, num_classes), cache.labels.repeat(num_layers),
                           reduction="none").view(num_layers, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with train.tsv, dev.tsv, test.tsv")
    parser.add_argument("--train-examples", type=int, default=8000)
    parser.add_argument("--dev-examples", type=int, default=1000)
    parser.add_argument("--stage1", default="runs/bench-sst2/model",
                        help="stage-1 run (weighted, 2 epochs) shared by all ConsistentEE runs; trained if missing")
    parser.add_argument("--alphas", default="0.25,0.5,1,2,4")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--run-dir", default="runs/bench-cee")
    parser.add_argument("--output", default="benchmarks/results/sst2_consistentee.json")
    parser.add_argument("--tolerance", type=float, default=0.005, help="0.5 accuracy point")
    args = parser.parse_args()
    started = time.perf_counter()
    run_dir = Path(args.run_dir)
    train_data = load_data(args.data, "train", limit=args.train_examples)
    dev_fit = load_data(args.data, "dev", limit=args.dev_examples)
    datasets = {"dev": dev_fit, "sst2": load_data(args.data, "test"), "rotten-tomatoes": load_data("rotten-tomatoes", "test")}
    stage1_config = TrainConfig(epochs=2, batch_size=32, learning_rate=5e-5, seed=42)
    cee_defaults = dict(copies=args.copies, stage2_epochs=2, stage3_epochs=1)

    # baseline with the same budget: weighted objective for 2 + 1 epochs
    baseline_dir = run_dir / "baseline-weighted-3ep"
    if (baseline_dir / "best").is_dir() and (baseline_dir / "final").is_dir():
        baseline = MultiExitModel.from_pretrained(baseline_dir / "best")
        tokenizer = AutoTokenizer.from_pretrained(baseline_dir / "best")
    else:
        baseline, tokenizer, _ = train_classifier("all-MiniLM-L6-v2", train_data, dev_fit, baseline_dir,
                                                  max_length=64, config=TrainConfig(**{**asdict(stage1_config),
                                                                                       "epochs": 3}))
    caches = {"baseline": evaluate_model(baseline, tokenizer, datasets)}
    stage1 = MultiExitModel.from_pretrained(Path(args.stage1) / "best") if (Path(args.stage1) / "best").is_dir() \
        else None
    alphas = [float(a) for a in args.alphas.split(",")]
    sweep_runs = [f"alpha={a:g}" for a in alphas]
    runs = {name: dict(alpha=a) for name, a in zip(sweep_runs, alphas)}
    runs.update({"alpha=1 no-hardness": dict(alpha=1.0, hardness=False), "alpha=0": dict(alpha=0.0),
                 "alpha=1 greedy": dict(alpha=1.0, action="greedy")})
    configs = {}
    for name, overrides in runs.items():
        config = ConsistentEEConfig(**{**cee_defaults, **overrides})
        configs[name] = asdict(config)
        folder = run_dir / name.replace(" ", "_").replace("=", "")
        model, tok = train_consistentee("all-MiniLM-L6-v2", train_data, dev_fit, folder, config, stage1_config,
                                        max_length=64, stage1_dir=args.stage1)
        caches[name] = evaluate_model(model, tok, datasets)
        print(f"[{time.perf_counter() - started:.0f}s] {name}: test policy@0.5 "
              f"{policy_point(caches[name]['sst2'], 0.5)}")
    if stage1 is None:
        stage1 = MultiExitModel.from_pretrained(Path(args.stage1) / "best")
    caches["stage1"] = evaluate_model(stage1, tokenizer, datasets)

    chosen = pick_on_dev({r: caches[r] for r in sweep_runs}, args.tolerance)
    report = {}
    for split in ("sst2", "rotten-tomatoes"):
        base = simulated_results(caches["baseline"][split], "all-MiniLM-L6-v2 weighted 3 epochs", datasets[split],
                                 CLASSIC, args.tolerance)
        entry = {"baseline": {k: base[k] for k in ("full", "per_layer_accuracy", "oracles", "curves")}}
        entry["consistentee_alpha_sweep"] = [dict(policy_point(caches[r][split], 0.5), run=r) for r in sweep_runs]
        for r in sweep_runs:
            entry["consistentee_alpha_sweep"][sweep_runs.index(r)]["params"] = {"alpha": configs[r]["alpha"],
                                                                               "threshold": 0.5}
        runs_results = {}
        for r in runs:
            res = simulated_results(caches[r][split], r, datasets[split], DEFAULT_SWEEP, args.tolerance)
            runs_results[r] = {k: res[k] for k in ("full", "per_layer_accuracy", "oracles", "curves")}
        entry["consistentee_runs"] = runs_results
        curves = dict(base["curves"])
        curves["consistentee"] = entry["consistentee_alpha_sweep"]
        if chosen:
            curves["consistentee-threshold"] = runs_results[chosen[0]]["curves"]["consistentee-threshold"]
        full = base["full"]["accuracy"]
        entry["curves"] = curves
        entry["area_under_curve"] = {name: area_under_curve(c) for name, c in curves.items()}
        entry["operating_points"] = {name: operating_point(c, full, args.tolerance) for name, c in curves.items()}
        if chosen:
            run, threshold, _ = chosen
            point = policy_point(caches[run][split], threshold)
            own_full = runs_results[run]["full"]["accuracy"]
            oracle = base["oracles"]["agreement"]["saved_layers"]
            entry["chosen_on_dev"] = {
                "run": run, "threshold": threshold, "point": point, "baseline_full_accuracy": full,
                "own_full_accuracy": own_full, "within_half_point_of_baseline_full": point["accuracy"] >= full - 0.005,
                "agreement_oracle_saved_baseline": oracle,
                "fraction_of_oracle_savings": point["saved_layers"] / oracle if oracle else None,
                "target_met": point["accuracy"] >= full - 0.005 and point["saved_layers"] >= 0.85 * oracle,
            }
        report[split] = entry

    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_all(report, caches, runs, configs, sweep_runs, run_dir, out_dir)
    payload = {
        "benchmark": "sst2_consistentee", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "args": vars(args), "seconds": time.perf_counter() - started, "configs": configs,
        "chosen_on_dev": [chosen[0], chosen[1]] if chosen else None, "results": report,
        "training_histories": {r: json.loads((run_dir / r.replace(" ", "_").replace("=", "") / "history.json")
                                             .read_text()) for r in runs},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    for split, entry in report.items():
        print(f"\n{split}: area under accuracy vs saved layers")
        for name, auc in sorted(entry["area_under_curve"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:>24}: {auc:.4f}")
        print(f"  chosen on dev: {entry.get('chosen_on_dev')}")
    print(f"wrote {args.output} and {out_dir}")


def plot_all(report, caches, runs, configs, sweep_runs, run_dir, out_dir):
    test = report["sst2"]
    # 1. all methods on one figure
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve in test["curves"].items():
        pts = sorted(curve, key=lambda p: p["saved_layers"])
        style = "-o" if name.startswith("consistentee") else "--."
        ax.plot([100 * p["saved_layers"] for p in pts], [100 * p["accuracy"] for p in pts], style, label=name,
                linewidth=2.2 if name.startswith("consistentee") else 1.0)
    oracle = test["baseline"]["oracles"]["agreement"]
    ax.plot(100 * oracle["saved_layers"], 100 * oracle["accuracy"], "k*", markersize=12, label="agreement oracle")
    ax.axhline(100 * test["baseline"]["full"]["accuracy"], color="gray", linestyle=":", label="full model")
    ax.set_xlabel("saved layers % (simulated)")
    ax.set_ylabel("accuracy % (GLUE SST-2 validation)")
    ax.set_ylim(bottom=max(50, ax.get_ylim()[0]))
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("ConsistentEE versus classic exit rules, MiniLM-L6")
    fig.tight_layout()
    fig.savefig(out_dir / "methods.png", dpi=120)
    plt.close(fig)
    # 2. accuracy and saved layers against alpha
    alphas = [configs[r]["alpha"] for r in sweep_runs]
    points = test["consistentee_alpha_sweep"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(alphas, [100 * p["accuracy"] for p in points], "o-", color="tab:blue", label="accuracy %")
    ax.set_xscale("log")
    ax.set_xlabel("alpha (layer cost, e/L form)")
    ax.set_ylabel("accuracy %", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(alphas, [100 * p["saved_layers"] for p in points], "s--", color="tab:red")
    ax2.set_ylabel("saved layers %", color="tab:red")
    ax.set_title("ConsistentEE: accuracy and saved layers against alpha (threshold 0.5)")
    fig.tight_layout()
    fig.savefig(out_dir / "alpha.png", dpi=120)
    plt.close(fig)
    # 3. memorized layers
    memorized = torch.load(run_dir / sweep_runs[0].replace("=", "") / "memorized.pt",
                           weights_only=True)["memorized"]
    num_layers = caches["stage1"]["sst2"].num_layers
    fig, ax = plt.subplots(figsize=(6, 4))
    counts = torch.bincount(memorized - 1, minlength=num_layers)
    ax.bar(range(1, num_layers + 1), (100 * counts / counts.sum()).tolist())
    ax.set_xlabel("memorized layer m(x)")
    ax.set_ylabel("% of training instances")
    ax.set_title("Memorized layers of the training set (stage-1 model)")
    fig.tight_layout()
    fig.savefig(out_dir / "memorized_layers.png", dpi=120)
    plt.close(fig)
    # 4. per-layer loss distributions, weighted sum versus ConsistentEE (the paper's Figure 2)
    weighted = per_layer_losses(caches["baseline"]["sst2"])
    consistent = per_layer_losses(caches["alpha=1"]["sst2"]) if "alpha=1" in caches else None
    fig, ax = plt.subplots(figsize=(8, 4))
    positions = torch.arange(1, num_layers + 1).float()
    ax.boxplot([w.numpy() for w in weighted], positions=(positions - 0.2).tolist(), widths=0.35,
               showfliers=False, patch_artist=True, boxprops={"facecolor": "tab:gray"})
    if consistent is not None:
        ax.boxplot([c.numpy() for c in consistent], positions=(positions + 0.2).tolist(), widths=0.35,
                   showfliers=False, patch_artist=True, boxprops={"facecolor": "tab:blue"})
    ax.set_xticks(positions.tolist(), [str(i) for i in range(1, num_layers + 1)])
    ax.set_xlabel("exit layer")
    ax.set_ylabel("cross-entropy (test)")
    ax.set_title("Per-layer loss: weighted sum (gray) vs ConsistentEE alpha=1 (blue)")
    fig.tight_layout()
    fig.savefig(out_dir / "per_layer_loss.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""ConsistentEE's stage 2 on a finished stage-1 model: which policy, reward and estimator beat max-prob on the
very same exits (MiniLM-L6, SST-2)?

Stage 2 trains only the policies, on the frozen stage-1 model's exit features, so every variant here sees
exactly the exits max-prob sees and the comparison is about the exit decision alone. The frozen model's logits
and exit features are computed once per split (kept in ``RUN_DIR``); each (variant, policy seed) then trains
fresh policies with ``layerexit.consistentee.schedule.run_stage2`` (the library's stage 2) and is evaluated by
simulation over the cached GLUE SST-2 validation logits (``test.tsv``): the policy's threshold curve
(``consistentee-threshold``), for an alpha-conditioned policy its dial (``consistentee``), the areas under
accuracy versus saved layers, the most layers saved within ``--tolerance`` of the full model, and the
threshold-0.5 point. Policy seeds change the policies' initialisation, data order and sampled actions (not
stage 1): the spread is the policy's own variability. Differences to max-prob are claimed only beyond it
(``layerexit.consistentee.evidence.compare``).

A variant is a name from ``VARIANTS`` or an ad-hoc ``key=value+key=value`` list of ``ConsistentEEConfig``
fields (e.g. ``alpha=0.3+estimator=expected``). ``--policy-data heldout`` trains the policies on training
phrases the stage-1 model has not seen (``--heldout-start`` on), so that their confidence behaves as it will at
test time; ``train`` uses stage 1's own training phrases, as the paper does.

    python benchmarks/sst2_consistentee_policies.py --model /work/runs/sst2-minilm/best \\
        --data data/sst2 --variants paper,inputs --policy-seeds 1,2,3
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoTokenizer

from layerexit.consistentee import ConsistentEEConfig
from layerexit.consistentee.evidence import compare, dial_coverage, dial_versus_runs, summarize
from layerexit.consistentee.rollout import memorized_layer
from layerexit.consistentee.schedule import run_stage2
from layerexit.data import Encoded, load_data, model_inputs
from layerexit.evaluation.cache import LogitCache, default_dial, policy_probabilities
from layerexit.evaluation.evaluate import sweep
from layerexit.evaluation.metrics import area_under_curve, operating_point
from layerexit.evaluation.simulate import per_layer_accuracy, simulate
from layerexit.io import write_json_atomic
from layerexit.model import MultiExitModel
from layerexit.rules import make_rule
from layerexit.training.trainer import seed_everything

CLASSIC = ["maxprob", "entropy", "patience-confidence", "static"]
#: named variants (ConsistentEEConfig overrides); stage 2 only in this benchmark
#: the paper's training (REINFORCE on -CE - cost, stage 2 at lr 3e-4; epochs from --stage2-epochs, default 2)
PAPER_TRAINING = dict(reward="paper", estimator="reinforce", stage2_learning_rate=3e-4)
VARIANTS = {
    "paper": dict(PAPER_TRAINING, policy_inputs=(), alpha=1.0),
    "inputs": dict(PAPER_TRAINING, alpha=1.0),
}


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def variant_config(name: str, base: dict) -> ConsistentEEConfig:
    """``name`` from VARIANTS, or ``key=value+key=value`` (values parsed as the field's type)."""
    if name in VARIANTS:
        overrides = VARIANTS[name]
    else:
        types = {f.name: f.type for f in fields(ConsistentEEConfig)}
        overrides = {}
        for item in name.split("+"):
            key, _, value = item.partition("=")
            if key not in types:
                raise SystemExit(f"variant {name!r}: unknown field {key!r}; choose from {', '.join(types)}")
            kind = types[key] if isinstance(types[key], str) else types[key].__name__
            overrides[key] = (float(value) if kind == "float" else int(value) if kind == "int"
                              else value.lower() in ("1", "true", "yes") if kind == "bool"
                          else value.replace(":", ","))  # alpha_range=0:1 (commas separate variants)
    config = ConsistentEEConfig(**{**base, "stage3_epochs": 0, **overrides})
    config.validate()
    return config


@torch.no_grad()
def split_pass(model, tokenizer, data, path: Path, batch_size: int = 128) -> dict:
    """(L, N, C) logits, (N, L, H) exit features, (N,) labels of the frozen model over ``data`` (cached)."""
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["labels"].numel() == len(data):
            return saved
    model.eval()
    encoded = Encoded(data, tokenizer, model.config.max_length)
    logits, features = [], []
    for start in range(0, len(encoded), batch_size):
        batch = encoded.collate([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))])
        z, h = model(**model_inputs(batch), return_features=True)  # (L, b, C), (L, b, H)
        logits.append(z.float())
        features.append(h.float().transpose(0, 1))
    saved = {"logits": torch.cat(logits, 1), "features": torch.cat(features, 0), "labels": torch.tensor(encoded.labels)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)
    return saved


def model_entry(cache: LogitCache, full: float, tolerance: float, rules: list[str]) -> dict:
    curves = sweep(cache, rules)
    return {"curves": curves, "areas": {n: area_under_curve(c) for n, c in curves.items()},
            "operating_points": {n: operating_point(c, full, tolerance) for n, c in curves.items()}}


def train_variant(args, name: str, seed: int, stage1: Path, train_split: dict, test_split: dict, full: float) -> dict:
    base = {"copies": args.copies, "stage2_epochs": args.stage2_epochs}
    config = variant_config(name, base)
    model = MultiExitModel.from_pretrained(stage1)
    seed_everything(seed)
    model.add_policies(config.policy_hidden, config.inputs, config.alpha_bounds, config.alpha)
    memorized = memorized_layer(train_split["logits"].argmax(-1) == train_split["labels"])
    started = time.perf_counter()
    history = run_stage2(model, train_split["features"], train_split["labels"], memorized, config, seed)
    seconds = time.perf_counter() - started
    model.eval()
    features = test_split["features"].transpose(0, 1)  # (L, N, H)
    with torch.no_grad():
        policy = policy_probabilities(model, features, test_split["logits"], None)
        dial = default_dial(model.config.policy_alpha_range) if model.alpha_conditioned else []
        by_alpha = {a: policy_probabilities(model, features, test_split["logits"], a) for a in dial} or None
    cache = LogitCache(test_split["logits"], test_split["labels"], policy, by_alpha)
    entry = model_entry(cache, full, args.tolerance, ["consistentee"])
    sim = simulate(make_rule("consistentee"), cache.logits, signals=cache.signals)
    entry["threshold_0.5"] = sim.point(cache.labels, cache.num_layers, {"threshold": 0.5, "alpha": config.alpha})
    entry["exit_fractions_0.5"] = (torch.bincount(sim.exit_layer - 1, minlength=cache.num_layers).double()
                                   / sim.exit_layer.numel()).tolist()
    if config.alpha_bounds:
        entry["dial_coverage"] = dial_coverage(entry["curves"]["consistentee"])
    entry.update(config=asdict(config), seed=seed, history=history, stage2_seconds=seconds)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the finished stage-1 model folder (e.g. RUN/best)")
    parser.add_argument("--data", required=True, help="folder with train.tsv, dev.tsv, test.tsv (SST-2)")
    parser.add_argument("--train-examples", type=int, default=8000, help="stage 1's training phrases (the first N)")
    parser.add_argument("--policy-data", choices=("train", "heldout"), default="train")
    parser.add_argument("--heldout-start", type=int, default=8000, help="first training phrase of --policy-data "
                        "heldout (must lie past stage 1's phrases)")
    parser.add_argument("--heldout-examples", type=int, default=8000)
    parser.add_argument("--variants", default="paper,inputs")
    parser.add_argument("--policy-seeds", default="1,2,3")
    parser.add_argument("--stage2-epochs", type=int, default=2, help="stage-2 epochs of every variant that does not "
                        "name stage2_epochs itself (this replaces ConsistentEEConfig's default of 10; 2 is the "
                        "paper-form recipe)")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--fixed-for-dial", default="", help="DIAL->FIXED1|FIXED2;...: compare each dial variant's "
                        "curve with these fixed-alpha variants' threshold-0.5 points")
    parser.add_argument("--run-dir", default="runs/bench-cee-policies")
    parser.add_argument("--output", default="benchmarks/results/sst2_consistentee_policies.json")
    parser.add_argument("--report-only", action="store_true", help="train nothing; aggregate finished variants")
    args = parser.parse_args()
    started = time.perf_counter()
    stage1 = Path(args.model)
    run_dir = Path(args.run_dir)
    model = MultiExitModel.from_pretrained(stage1)
    tokenizer = AutoTokenizer.from_pretrained(stage1)
    if args.policy_data == "heldout":
        if args.heldout_start < args.train_examples:
            parser.error("--heldout-start must lie past stage 1's training phrases")
        rows = load_data(args.data, "train", limit=args.heldout_start + args.heldout_examples)
        policy_rows = type(rows)(rows.texts[args.heldout_start:], rows.labels[args.heldout_start:], rows.label_names,
                                 None, rows.name, rows.split)
        tag = f"train{args.heldout_start}-{args.heldout_start + len(policy_rows)}"
    else:
        policy_rows = load_data(args.data, "train", limit=args.train_examples)
        tag = f"train0-{len(policy_rows)}"
    train_split = split_pass(model, tokenizer, policy_rows, run_dir / f"pass_{tag}.pt")
    test_split = split_pass(model, tokenizer, load_data(args.data, "test"), run_dir / "pass_test.pt")
    base_cache = LogitCache(test_split["logits"], test_split["labels"])
    accs = per_layer_accuracy(base_cache.logits, base_cache.labels)
    full = accs[-1]
    baseline = model_entry(base_cache, full, args.tolerance, CLASSIC)
    oracle = simulate(make_rule("oracle-agreement"), base_cache.logits, base_cache.final_predictions)
    train_accs = per_layer_accuracy(train_split["logits"], train_split["labels"])
    memorized = memorized_layer(train_split["logits"].argmax(-1) == train_split["labels"])

    seeds = [int(s) for s in args.policy_seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    results = {}
    for name in variants:
        results[name] = []
        for seed in seeds:
            path = run_dir / tag / f"{name}@{seed}.json"
            if path.is_file():
                entry = json.loads(path.read_text())
            elif args.report_only:
                continue
            else:
                entry = train_variant(args, name, seed, stage1, train_split, test_split, full)
                write_json_atomic(path, entry)
            results[name].append(entry)
            t05 = entry["threshold_0.5"]
            op = entry["operating_points"]["consistentee-threshold"]
            print(f"{name}@{seed}: area {entry['areas']['consistentee-threshold']:.4f}"
                  + (f" dial {entry['areas']['consistentee']:.4f}" if "consistentee" in entry["areas"] else "")
                  + f"; saved within tol {op['saved_layers'] if op else 0:.3f}; t0.5 {t05['accuracy']:.4f}/"
                  f"{t05['saved_layers']:.3f}; exits {[round(f, 2) for f in entry['exit_fractions_0.5']]}", flush=True)

    maxprob_area = baseline["areas"]["maxprob"]
    maxprob_op = baseline["operating_points"]["maxprob"]
    summary = {}
    for name, entries in results.items():
        if not entries:
            continue
        row = {}
        for curve in entries[0]["areas"]:
            areas = [e["areas"][curve] for e in entries]
            saved = [(e["operating_points"][curve] or {}).get("saved_layers", 0.0) for e in entries]
            row[curve] = {"area": summarize(areas), "saved_within_tolerance": summarize(saved),
                          "area_versus_maxprob": compare(areas, [maxprob_area] * len(areas)),
                          "saved_versus_maxprob": compare(saved, [maxprob_op["saved_layers"]] * len(saved))}
        row["threshold_0.5"] = {"accuracy": summarize([e["threshold_0.5"]["accuracy"] for e in entries]),
                                "saved_layers": summarize([e["threshold_0.5"]["saved_layers"] for e in entries])}
        if "dial_coverage" in entries[0]:
            row["dial_coverage"] = [e["dial_coverage"] for e in entries]
        summary[name] = row
    for spec in [s for s in args.fixed_for_dial.split(";") if s]:
        dial, _, fixed = spec.partition("->")
        fixed = fixed.split("|")
        if dial in results and all(f in results for f in fixed):
            summary.setdefault(dial, {})["dial_versus_fixed_runs"] = [
                dial_versus_runs(d["curves"]["consistentee"],
                                 [next(e for e in results[f] if e["seed"] == d["seed"])["threshold_0.5"]
                                  for f in fixed], args.tolerance)
                for d in results[dial] if all(any(e["seed"] == d["seed"] for e in results[f]) for f in fixed)]
    payload = {
        "benchmark": "sst2_consistentee_policies",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "loadavg": loadavg()},
        "args": vars(args), "seconds": time.perf_counter() - started,
        "stage1": {"model": str(stage1), "test_per_layer_accuracy": accs, "full_accuracy": full,
                   "policy_data": tag, "policy_data_per_layer_accuracy": train_accs,
                   "policy_data_memorized_histogram": torch.bincount(memorized - 1, minlength=len(accs)).tolist(),
                   "agreement_oracle_saved": float(1 - oracle.exit_layer.double().mean() / len(accs))},
        "baseline": baseline, "variants": {n: [{k: v for k, v in e.items() if k != "curves"} | {"curves": e["curves"]}
                                              for e in entries] for n, entries in results.items()},
        "summary": summary,
    }
    write_json_atomic(Path(args.output), payload)
    print(f"\nstage 1: test per-layer {[round(a, 4) for a in accs]}; policy data per-layer "
          f"{[round(a, 4) for a in train_accs]}; oracle saves {payload['stage1']['agreement_oracle_saved']:.3f}")
    print(f"max-prob: area {maxprob_area:.4f}, saved within tol {maxprob_op['saved_layers'] if maxprob_op else 0:.3f}")
    for name, row in summary.items():
        for curve, r in row.items():
            if isinstance(r, dict) and "area" in r:
                print(f"{name:>40} {curve:>22}: area {r['area']['mean']:.4f} +- {r['area']['std']:.4f} "
                      f"({r['area_versus_maxprob']['verdict']}); saved {r['saved_within_tolerance']['mean']:.3f} +- "
                      f"{r['saved_within_tolerance']['std']:.3f} ({r['saved_versus_maxprob']['verdict']})")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

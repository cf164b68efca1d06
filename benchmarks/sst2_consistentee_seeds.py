"""ConsistentEE against max-prob on the weighted baseline, over several seeds (MiniLM-L6, SST-2).

Per seed (the training seed and the data order): stage 1 is PABEE's weighted objective on the first N SST-2
training phrases (that model is also the weighted baseline the classic rules run on; ``--stage1-objective
distilled`` trains it with self-distillation instead, and the classic rules then run on that model); every
ConsistentEE variant starts from it. Variants (see ``VARIANTS``):

- ``*-s2``: stages 2 only (policies trained on the frozen stage-1 model, cached features): the exits are the
  baseline's, so the policy is compared with max-prob on the very same exits;
- without ``-s2``: stage 2 + stage 3 (one epoch, everything trained), with the remedies for starving exits.

Every curve is simulated over cached logits on GLUE SST-2 validation (``test.tsv``); areas under accuracy
versus saved layers and operating points (most layers saved within ``--tolerance`` of the baseline's full
model) are written per seed and as mean +- std, with a difference to max-prob claimed only beyond the seeds'
spread (``layerexit.consistentee.evidence.compare``). The alpha-conditioned model's dial is checked for
coverage (20%-70% saved, no gap over 10 points) and against the separately trained fixed-alpha runs.

A variant named ``NAME@P`` is NAME trained with policy seed P on the same stage 1 (stage 2's initialisation,
data order and sampled actions change, stage 1 does not): ``--policy-seeds`` aggregates those as a cheaper,
weaker spread (the policy's own variability only), reported apart from the full-pipeline seeds.

Each seed's results are written to ``RUN_DIR/seed<N>/results.json`` and reused, so seeds can be run one
process at a time (each under the heavy lock) and aggregated by a last call that trains nothing:

    flock /tmp/layerexit-heavy.lock python benchmarks/sst2_consistentee_seeds.py --data DATA --seeds 1
    ...                                                                           --seeds 2, then 3
    python benchmarks/sst2_consistentee_seeds.py --data DATA --seeds 1,2,3      # aggregates, writes the JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoTokenizer

from layerexit.catalog import DISTILL_DEFAULTS
from layerexit.consistentee import ConsistentEEConfig, train_consistentee
from layerexit.consistentee.evidence import compare, dial_coverage, dial_versus_runs, summarize
from layerexit.data import Encoded, load_data
from layerexit.data import model_inputs
from layerexit.evaluation.cache import LogitCache, collect_logits, default_dial, policy_probabilities
from layerexit.evaluation.evaluate import sweep
from layerexit.evaluation.metrics import area_under_curve, operating_point
from layerexit.evaluation.simulate import per_layer_accuracy, simulate
from layerexit.io import write_json_atomic
from layerexit.model import MultiExitModel
from layerexit.rules import make_rule
from layerexit.training import TrainConfig
from layerexit.training.run import train_classifier

CLASSIC = ["maxprob", "margin", "entropy", "patience-confidence", "static"]
DIAL = (0.1, 3.0)
#: variant -> ConsistentEEConfig overrides ("-s2": stage 2 only on the frozen stage-1 model)
#: the settings these variants were measured with before the defaults changed (the paper's reward and estimator)
_P = dict(reward="paper", estimator="reinforce", stage2_learning_rate=3e-4)
VARIANTS = {
    "paper-s2": dict(_P, policy_inputs=(), alpha=1.0, stage3_epochs=0),
    "inputs-s2": dict(_P, alpha=1.0, stage3_epochs=0),
    "alpha0.5-s2": dict(_P, alpha=0.5, stage3_epochs=0),
    "alpha2-s2": dict(_P, alpha=2.0, stage3_epochs=0),
    "dial-s2": dict(_P, alpha_range=DIAL, stage3_epochs=0),
    "dial-entropy-s2": dict(_P, alpha_range=DIAL, policy_entropy=0.01, stage3_epochs=0),
    "ce-reward-s2": dict(_P, reward="ce", stage3_epochs=0),
    "dial": dict(_P, alpha_range=DIAL),
    "dial-allexits": dict(_P, alpha_range=DIAL, all_exits_weight=0.3),
    "dial-entropy": dict(_P, alpha_range=DIAL, policy_entropy=0.01),
    "dial-rounds2": dict(_P, alpha_range=DIAL, rounds=2),
    "paper": dict(_P, policy_inputs=(), alpha=1.0),
}
#: fixed-alpha runs the dial of each dial variant is compared with
FIXED_FOR_DIAL = {"dial-s2": ["alpha0.5-s2", "inputs-s2", "alpha2-s2"]}


def variant_overrides(name: str) -> dict:
    """ConsistentEEConfig overrides of a variant: a name from VARIANTS, or an ad-hoc ``key=value+key=value``
    list of fields (values parsed as the field's type; ``-s2`` in a name from VARIANTS means stage 2 only)."""
    if name in VARIANTS:
        return VARIANTS[name]
    from dataclasses import fields

    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(ConsistentEEConfig)}
    overrides = {}
    for item in name.split("+"):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"variant {name!r}: unknown field {key!r}; choose from {', '.join(types)}")
        kind = types[key]
        overrides[key] = (float(value) if kind == "float" else int(value) if kind == "int"
                          else value.lower() in ("1", "true", "yes") if kind == "bool"
                          else value.replace(":", ","))  # alpha_range=0:1 (commas separate variants)
    return overrides


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def policy_histogram(cache, threshold: float = 0.5) -> list[float]:
    """Fraction of rows exiting at each layer under the policy at ``threshold`` (the model's default alpha)."""
    sim = simulate(make_rule("consistentee", threshold=threshold), cache.logits, signals=cache.signals)
    return (torch.bincount(sim.exit_layer - 1, minlength=cache.num_layers).double() / sim.exit_layer.numel()).tolist()


@torch.no_grad()
def logits_and_features(model, encoded, batch_size: int = 128):
    """(L, N, C) logits, (L, N, H) exit features and (N,) labels of ``model`` (eval mode) over ``encoded``."""
    model.eval()
    logits, features = [], []
    for start in range(0, len(encoded), batch_size):
        batch = encoded.collate([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))])
        z, h = model(**model_inputs(batch), return_features=True)  # (L, b, C), (L, b, H)
        logits.append(z.float())
        features.append(h.float())
    return torch.cat(logits, 1), torch.cat(features, 1), torch.tensor(encoded.labels)


def same_exits(model, baseline) -> bool:
    """Whether ``model`` has ``baseline``'s backbone and exits (stage 2 only trains the policies)."""
    theirs = baseline.state_dict()
    return all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items() if not k.startswith("policies."))


@torch.no_grad()
def policy_cache(model, logits, features, labels) -> LogitCache:
    """The cache ``collect_logits`` would give for a model that shares the cached ``logits`` and ``features``
    and differs only by its policies (computed here, at its default alpha and along its dial)."""
    model.eval()
    policy = policy_probabilities(model, features, logits, None)
    dial = default_dial(model.config.policy_alpha_range) if model.alpha_conditioned else []
    by_alpha = {a: policy_probabilities(model, features, logits, a) for a in dial} or None
    return LogitCache(logits, labels, policy, by_alpha)


def model_entry(cache, full: float, tolerance: float, rules: list[str]) -> dict:
    """Curves, areas, operating points (against the baseline's full accuracy ``full``) of one model."""
    curves = sweep(cache, rules)
    return {
        "full_accuracy": per_layer_accuracy(cache.logits, cache.labels)[-1],
        "per_layer_accuracy": per_layer_accuracy(cache.logits, cache.labels),
        "curves": curves,
        "areas": {name: area_under_curve(c) for name, c in curves.items()},
        "operating_points": {name: operating_point(c, full, tolerance) for name, c in curves.items()},
    }


def run_seed(args, seed: int, variants: list[str]) -> dict:
    seed_dir = Path(args.run_dir) / f"seed{seed}"
    out_path = seed_dir / "results.json"
    done = json.loads(out_path.read_text()) if out_path.is_file() else {"seed": seed, "models": {}, "seconds": {}}
    todo = [v for v in variants if v not in done["models"]]
    if "baseline" in done["models"] and not todo:
        return done
    started = time.perf_counter()
    done.setdefault("loadavg_start", loadavg())
    train = load_data(args.data, "train", limit=args.train_examples)
    dev = load_data(args.data, "dev", limit=args.dev_examples)
    test = load_data(args.data, "test")
    train_config = TrainConfig(epochs=args.stage1_epochs, batch_size=32, learning_rate=5e-5, seed=seed)
    stage1 = Path(args.stage1) if args.stage1 else seed_dir / "stage1"
    if not ((stage1 / "best").is_dir() and (stage1 / "final").is_dir()):
        t = time.perf_counter()
        train_classifier(args.model, train, dev, stage1, args.stage1_objective, max_length=args.max_length,
                         config=train_config, distill_weight=args.distill_weight,
                         distill_temperature=args.distill_temperature)
        done["seconds"]["stage1"] = time.perf_counter() - t
    baseline = MultiExitModel.from_pretrained(stage1 / "best")
    tokenizer = AutoTokenizer.from_pretrained(stage1 / "best")
    test_set = Encoded(test, tokenizer, baseline.config.max_length)
    base_logits, base_features, labels = logits_and_features(baseline, test_set)
    base_cache = LogitCache(base_logits, labels)
    full = per_layer_accuracy(base_cache.logits, base_cache.labels)[-1]
    done["models"]["baseline"] = model_entry(base_cache, full, args.tolerance, CLASSIC)
    done["baseline_full_accuracy"] = full
    done["agreement_oracle_saved"] = float(1 - simulate(make_rule("oracle-agreement"), base_cache.logits,
                                                        base_cache.final_predictions).exit_layer.double().mean()
                                           / base_cache.num_layers)
    write_json_atomic(out_path, done)
    for name in todo:
        t = time.perf_counter()
        base_name, _, policy_seed = name.partition("@")
        config = ConsistentEEConfig(**{"copies": args.copies, "stage2_epochs": args.stage2_epochs,
                                       "stage3_epochs": args.stage3_epochs, **variant_overrides(base_name)})
        run_config = TrainConfig(**{**asdict(train_config), "seed": int(policy_seed)}) if policy_seed else train_config
        # the stage-1 pass (memorized layers, exit features) is shared by every variant of the seed; the dev
        # split only picks the stage-1 checkpoint, which a one-epoch stage 1 does not need (best = final)
        pick = dev if args.stage1 or args.stage1_epochs > 1 else None
        model, _ = train_consistentee(args.model, train, pick, seed_dir / name, config, run_config,
                                      max_length=args.max_length, stage1_dir=stage1, cache_dir=seed_dir)
        if same_exits(model, baseline):  # policies only: reuse the baseline's test pass
            cache = policy_cache(model, base_logits, base_features, labels)
        else:
            cache = collect_logits(model, test_set, progress=False)
        entry = model_entry(cache, full, args.tolerance, ["consistentee", "maxprob"])
        entry["config"] = asdict(config)
        entry["policy_exit_fractions"] = policy_histogram(cache)
        entry["threshold_0.5"] = simulate(make_rule("consistentee"), cache.logits, signals=cache.signals).point(
            cache.labels, cache.num_layers, {"threshold": 0.5, "alpha": config.alpha})
        if config.alpha_bounds:
            entry["dial_coverage"] = dial_coverage(entry["curves"]["consistentee"])
        done["models"][name] = entry
        done["seconds"][name] = time.perf_counter() - t
        print(f"[seed {seed}] {name}: {time.perf_counter() - t:.0f}s, areas "
              f"{ {k: round(v, 4) for k, v in entry['areas'].items()} }", flush=True)
        write_json_atomic(out_path, done)
    for dial, fixed in FIXED_FOR_DIAL.items():
        if dial in done["models"] and all(f in done["models"] for f in fixed):
            done["models"][dial]["dial_versus_runs"] = dial_versus_runs(
                done["models"][dial]["curves"]["consistentee"], [done["models"][f]["threshold_0.5"] for f in fixed],
                args.tolerance)
    done["loadavg_end"] = loadavg()
    done["seconds"]["this_call"] = time.perf_counter() - started
    write_json_atomic(out_path, done)
    return done


def aggregate(per_seed: list[dict], tolerance: float) -> dict:
    """mean +- std over seeds of every (model, curve) area and operating point; comparisons with max-prob."""
    keys = sorted({(m, c) for s in per_seed for m, e in s["models"].items() for c in e["areas"]})
    table, reference = {}, None
    for model, curve in keys:
        if not all(model in s["models"] and curve in s["models"][model]["areas"] for s in per_seed):
            continue
        areas = [s["models"][model]["areas"][curve] for s in per_seed]
        points = [s["models"][model]["operating_points"][curve] for s in per_seed]
        table[f"{curve}@{model}"] = {
            "area": summarize(areas),
            "saved_within_tolerance": summarize([p["saved_layers"] if p else 0.0 for p in points]),
            "accuracy_at_operating_point": summarize([p["accuracy"] if p else float("nan") for p in points]),
            "full_accuracy": summarize([s["models"][model]["full_accuracy"] for s in per_seed]),
        }
    if "maxprob@baseline" in table:
        reference = table["maxprob@baseline"]
        for name, row in table.items():
            if name.startswith("consistentee"):
                row["area_versus_maxprob_baseline"] = compare(row["area"]["values"], reference["area"]["values"])
                row["saved_versus_maxprob_baseline"] = compare(row["saved_within_tolerance"]["values"],
                                                               reference["saved_within_tolerance"]["values"])
    dial = {}
    for name in {m for s in per_seed for m in s["models"]}:
        entries = [s["models"].get(name, {}) for s in per_seed]
        if all("dial_coverage" in e for e in entries):
            dial[name] = {"coverage": [e["dial_coverage"] for e in entries],
                          "versus_fixed_alpha_runs": [e.get("dial_versus_runs") for e in entries]}
    return {"table": table, "dial": dial, "tolerance": tolerance,
            "baseline_full_accuracy": summarize([s["baseline_full_accuracy"] for s in per_seed]),
            "agreement_oracle_saved": summarize([s["agreement_oracle_saved"] for s in per_seed])}


def _saved(curve, full: float, tolerance: float) -> float:
    point = operating_point(curve, full, tolerance)
    return point["saved_layers"] if point else 0.0


def versus_reference(per_seed: list[dict], reference: dict, tolerance: float) -> dict:
    """Every curve@model row of this run against ``reference``, another run of this benchmark on the same seeds
    (e.g. a distilled stage 1 against the weighted one): its area and layers saved against the same row there
    and against the reference's max-prob on its baseline. Saved layers are counted within ``tolerance`` of the
    *reference's* full model, so a stage 1 whose last exit is less accurate gains nothing from that."""
    by_seed = {s["seed"]: s for s in reference["per_seed"]}
    missing = [s["seed"] for s in per_seed if s["seed"] not in by_seed]
    if missing:
        raise SystemExit(f"--reference has no seed {missing}: compare runs over the same seeds")
    ref = [by_seed[s["seed"]] for s in per_seed]
    ref_full = [r["baseline_full_accuracy"] for r in ref]
    ref_maxprob = {"area": [r["models"]["baseline"]["areas"]["maxprob"] for r in ref],
                   "saved": [_saved(r["models"]["baseline"]["curves"]["maxprob"], f, tolerance)
                             for r, f in zip(ref, ref_full)]}
    rows = {}
    for model, curve in sorted({(m, c) for s in per_seed for m, e in s["models"].items() for c in e["curves"]}):
        if not all(model in s["models"] and curve in s["models"][model]["curves"] for s in per_seed):
            continue
        area = [s["models"][model]["areas"][curve] for s in per_seed]
        saved = [_saved(s["models"][model]["curves"][curve], f, tolerance) for s, f in zip(per_seed, ref_full)]
        row = {"area": summarize(area), "saved_within_tolerance_of_reference_full": summarize(saved),
               "area_versus_reference_maxprob": compare(area, ref_maxprob["area"]),
               "saved_versus_reference_maxprob": compare(saved, ref_maxprob["saved"])}
        if all(model in r["models"] and curve in r["models"][model]["curves"] for r in ref):
            row["area_versus_same_row"] = compare(area, [r["models"][model]["areas"][curve] for r in ref])
            row["saved_versus_same_row"] = compare(saved, [_saved(r["models"][model]["curves"][curve], f, tolerance)
                                                           for r, f in zip(ref, ref_full)])
        rows[f"{curve}@{model}"] = row
    return {"reference": reference.get("command"), "reference_full_accuracy": summarize(ref_full),
            "reference_maxprob": {"area": summarize(ref_maxprob["area"]), "saved": summarize(ref_maxprob["saved"])},
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with train.tsv, dev.tsv, test.tsv (SST-2)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--dev-examples", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--stage1-epochs", type=int, default=1)
    parser.add_argument("--stage2-epochs", type=int, default=2)
    parser.add_argument("--stage3-epochs", type=int, default=1)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--seeds", default="1,2,3", help="training seeds (each also sets the data order)")
    parser.add_argument("--variants", default="paper-s2,inputs-s2,alpha0.5-s2,alpha2-s2,dial-s2,dial-entropy-s2,"
                        "dial,dial-allexits", help=f"comma separated, from {','.join(VARIANTS)}")
    parser.add_argument("--stage1-objective", default="weighted", choices=["weighted", "distilled"],
                        help="stage 1's objective; its model is the baseline the classic rules run on (use another "
                        "--run-dir per objective)")
    parser.add_argument("--distill-weight", type=float, default=DISTILL_DEFAULTS["distill_weight"],
                        help="--stage1-objective distilled: the last exit's weight against the labels")
    parser.add_argument("--distill-temperature", type=float, default=DISTILL_DEFAULTS["distill_temperature"])
    parser.add_argument("--stage1", help="reuse this finished stage-1 run (best/, final/) for the (single) seed")
    parser.add_argument("--run-dir", default="runs/bench-cee-seeds")
    parser.add_argument("--output", default="benchmarks/results/sst2_consistentee_seeds.json")
    parser.add_argument("--tolerance", type=float, default=0.005, help="0.5 accuracy point")
    parser.add_argument("--policy-seeds", help="also aggregate NAME@P variants of the (single) stage-1 seed over "
                        "these policy seeds (the stage-1 seed itself stands for its own policy seed)")
    parser.add_argument("--aggregate-only", action="store_true", help="train nothing; aggregate finished seeds")
    parser.add_argument("--reference", help="results JSON of another run of this benchmark on the same seeds: every "
                        "row is also compared with it (same row, and its max-prob), saved layers counted within "
                        "--tolerance of its full model")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:  # names from VARIANTS or ad-hoc field lists (refused here when a field is unknown)
        variant_overrides(v.partition("@")[0])
    if args.stage1 and len(seeds) != 1:
        parser.error("--stage1 is one trained model: give exactly one seed with it")
    started = time.perf_counter()
    per_seed = []
    for seed in seeds:
        path = Path(args.run_dir) / f"seed{seed}" / "results.json"
        per_seed.append(json.loads(path.read_text()) if args.aggregate_only else run_seed(args, seed, variants))
    if args.policy_seeds:  # one stage-1 seed, several policy seeds: pseudo-seeds over the policy's variability
        policy_seeds = [int(s) for s in args.policy_seeds.split(",")]
        pseudo = []
        for ps in policy_seeds:
            models = {"baseline": per_seed[0]["models"]["baseline"]}
            for name, entry in per_seed[0]["models"].items():
                base_name, _, tag = name.partition("@")
                if (tag and int(tag) == ps) or (not tag and ps == per_seed[0]["seed"] and name != "baseline"):
                    models[base_name] = entry
            pseudo.append({**per_seed[0], "seed": ps, "models": models})
        policy_summary = aggregate(pseudo, args.tolerance)
    else:
        policy_summary = None
    payload = {
        "benchmark": "sst2_consistentee_seeds", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "loadavg": loadavg()},
        "args": vars(args), "seconds": time.perf_counter() - started,
        "variants": {v: variant_overrides(v.partition("@")[0]) for v in variants},
        "per_seed": per_seed, "summary": aggregate(per_seed, args.tolerance),
        "policy_seed_summary": policy_summary,
        "versus_reference": (versus_reference(per_seed, json.loads(Path(args.reference).read_text()), args.tolerance)
                             if args.reference else None),
    }
    write_json_atomic(Path(args.output), payload)
    summary = payload["summary"]
    print(f"\nbaseline full accuracy {summary['baseline_full_accuracy']['mean']:.4f} "
          f"+- {summary['baseline_full_accuracy']['std']:.4f}; agreement oracle saves "
          f"{summary['agreement_oracle_saved']['mean']:.3f}")
    print(f"{'curve@model':>40} {'area':>16} {'saved within tol':>18}  vs max-prob (area)")
    for name, row in sorted(summary["table"].items(), key=lambda kv: -kv[1]["area"]["mean"]):
        verdict = row.get("area_versus_maxprob_baseline", {}).get("verdict", "")
        print(f"{name:>40} {row['area']['mean']:.4f} +- {row['area']['std']:.4f} "
              f"{row['saved_within_tolerance']['mean']:.3f} +- {row['saved_within_tolerance']['std']:.3f}  {verdict}")
    if payload["versus_reference"]:
        print(f"\nagainst --reference (saved within tolerance of its full model): "
              f"{'area, vs its max-prob, vs same row':>44} {'saved, vs its max-prob, vs same row':>40}")
        for name, row in payload["versus_reference"]["rows"].items():
            same_area = row.get("area_versus_same_row", {}).get("verdict", "-")
            same_saved = row.get("saved_versus_same_row", {}).get("verdict", "-")
            print(f"{name[:60]:>60} {row['area']['mean']:.4f} {row['area_versus_reference_maxprob']['verdict']:>13} "
                  f"{same_area:>13}  {row['saved_within_tolerance_of_reference_full']['mean']:.3f} "
                  f"{row['saved_versus_reference_maxprob']['verdict']:>13} {same_saved:>13}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

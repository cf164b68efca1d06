"""Generation benchmark: early exit for generation on the packaged SmolLM2-135M (CPU, batch size 1).

Steps (each figure in the JSON is labelled simulated or measured):
1. exits: per-exit low-rank adapters trained by distillation from the last layer on Shakespeare (frozen
   backbone), or loaded from --exits if present;
2. simulated, teacher-forced on held-out Shakespeare blocks: per-layer agreement of each exit with the full
   model (shared head vs trained adapters) and sweeps of max-prob / margin / saturation thresholds; the
   operating point of each rule is the cheapest one with simulated agreement >= --target-agreement;
3. the ConsistentEE per-token policy trained on cached features of training blocks;
4. measured: greedy decoding of held-out prompts by the full model (our loop), transformers' generate, the
   early-exit rules at their operating points (both KV strategies) and self-speculative decoding, all
   interleaved per prompt in one process; token match and ROUGE-L against the full model's output.

    flock /tmp/layerexit-heavy.lock .venv/bin/python benchmarks/smollm2_generation.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from layerexit.evaluation.generation_report import write_generation_report
from layerexit.evaluation.simulate import Simulation
from layerexit.generation import EarlyExitLM, TokenRule, make_token_rule
from layerexit.generation.corpus import frequent_tokens, load_passages, prompts_from, token_blocks
from layerexit.generation.evaluate import compare
from layerexit.generation.loading import load_causal_lm
from layerexit.generation.teacher_forced import simulate_tokens
from layerexit.generation.train import (ExitTrainConfig, PolicyTrainConfig, collect_features, fit_shortcuts,
                                        train_exits, train_policy)
from layerexit.io import write_json_atomic
from layerexit.rules import AgreementOracle


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def agreement_point(sim: Simulation, full: torch.Tensor, threshold: float | None) -> dict:
    """A simulated operating point: average exit layer and agreement with the full model's tokens."""
    return {"avg_layers": float(sim.exit_layer.double().mean()),
            "agreement": float((sim.predictions == full).double().mean()), "threshold": threshold}


@torch.inference_mode()
def micro_costs(model, tok, vocab) -> dict:
    """Fastest-of-20 wall clock of the pieces a generated token pays for (measured, ms)."""
    from layerexit.generation import LayerKVCache
    from layerexit.generation.decode import prefill

    a = model.adapter
    ids = tok("The quality of mercy is not strained", return_tensors="pt").input_ids
    P = ids.shape[1]
    cache = LayerKVCache(model.num_layers)
    prefill(model, ids, cache)
    pos = torch.tensor([P])
    x = a.embed(torch.tensor([[5]]), pos)
    kw = a.layer_kwargs(x, pos)
    weight = a.lm_head.weight[vocab]

    def best(fn, n=20):
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return round(1000 * min(times), 3)

    def layers(k):
        def run():
            a.run_layers(x, 0, k, pos, cache, kw)
            cache.crop(P)
        return run

    project = a.kv_projector()
    mid = min(15, model.num_layers - 1)
    return {"one_layer": best(layers(1)), "all_layers": best(layers(model.num_layers)),
            "lm_head_full_vocab": best(lambda: model.exit_logits(model.num_layers, x[0, -1])),
            "lm_head_draft_vocab": best(lambda: torch.nn.functional.linear(model.exit_hidden(mid, x[0, -1]), weight)),
            "propagate_kv_from_mid": best(lambda: project(mid, x, kw)),
            "softmax_max": best(lambda: torch.softmax(model.exit_logits(mid, x[0, -1]), -1).max())}


@torch.inference_mode()
def held_out_perplexity(model, blocks: torch.Tensor) -> float:
    """exp of the full model's mean next-token cross-entropy on (N, T) blocks (measured)."""
    losses = []
    for i in range(0, blocks.shape[0], 4):
        batch = blocks[i:i + 4]
        logits = model.exit_logits(model.num_layers, model.all_hidden(batch[:, :-1])[-1]).float()  # (B, T-1, V)
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
    return float(torch.exp(torch.stack(losses).sum() / (blocks.shape[0] * (blocks.shape[1] - 1))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="packaged name, hub name or local folder")
    p.add_argument("--exits", default="runs/smollm2-exits")
    p.add_argument("--layers", default="6,10,15,20,25", help="exits to train and use")
    p.add_argument("--exit-kind", default="linear", choices=["linear", "lowrank"],
                   help="linear: per-exit affine shortcut fitted by ridge regression (Din et al. 2023); "
                   "lowrank: residual adapters trained by distillation")
    p.add_argument("--fit-blocks", type=int, default=100, help="linear: 128-token blocks used for the fit")
    p.add_argument("--adapter-rank", type=int, default=64, help="lowrank: per-exit adapter rank (0: none)")
    p.add_argument("--lora-rank", type=int, default=0, help="lowrank: also train LoRA in the backbone's attention "
                   "(LayerSkip-style: the exits' losses adapt the backbone itself)")
    p.add_argument("--lora-lr", type=float, default=1e-4)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--policy-blocks", type=int, default=16)
    p.add_argument("--alphas", default="1,4,8,16", help="ConsistentEE cost weights tried (policy per alpha)")
    p.add_argument("--rules", default="maxprob,margin,saturation", help="confidence rules measured")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds per prompt (fastest kept)")
    p.add_argument("--plain-speculative", action="store_true", help="also measure drafts without the draft "
                   "vocabulary and adaptive length")
    p.add_argument("--policy-epochs", type=int, default=20)
    p.add_argument("--policy-lr", type=float, default=1e-2)
    p.add_argument("--extra-steps", type=int, default=0, help="with loaded exits: train this many more steps")
    p.add_argument("--targets", default="0.9,0.75", help="simulated agreement targets for the rules' operating "
                   "points (the first is measured with both KV strategies, the others with propagation)")
    p.add_argument("--draft-vocab", type=int, default=4096, help="draft vocabulary: the corpus's most frequent ids")
    p.add_argument("--shared-draft-layers", default="15")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--draft-layers", default="10,15,20")
    p.add_argument("--num-draft", type=int, default=4)
    p.add_argument("--bonus-ablation", action="store_true", help="also measure speculative decoding without "
                   "verifying the last draft (no bonus token)")
    p.add_argument("--draft-threshold", type=float, default=0.5, help="adaptive draft length: stop below this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="benchmarks/results/smollm2_generation.json")
    p.add_argument("--plots", default="runs/smollm2-generation")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    load_at_start = os.getloadavg()  # 1, 5, 15 minutes: other work on the machine distorts the timings
    layers = ints(args.layers)
    lm, tok = load_causal_lm(args.model)
    shared = EarlyExitLM(lm, name=args.model)
    L = shared.num_layers
    test_blocks = token_blocks(tok, load_passages("shakespeare", "test"), 128, args.eval_blocks)
    perplexity = {"original": held_out_perplexity(shared, test_blocks)}
    if any((Path(args.exits) / name).is_file() for name in ("config.json", "exit_config.json")):  # saved exits
        trained = EarlyExitLM.with_exits(lm, args.exits, name=args.model)
        log(f"loaded exits from {args.exits}")
        if args.extra_steps and args.exit_kind == "lowrank":
            previous = dict(trained.config.training)
            blocks = token_blocks(tok, load_passages("shakespeare", "train"), 128,
                                  (args.train_steps + args.extra_steps) * args.train_batch)[args.train_steps * args.train_batch:]
            train_exits(trained, blocks, ExitTrainConfig(layers=layers, steps=args.extra_steps,
                                                         batch_size=args.train_batch, lr=args.lr, seed=1), log=log)
            trained.config.training["previous"] = previous
            trained.save_exits(args.exits)
    elif args.exit_kind == "linear":
        trained = EarlyExitLM(lm, adapter_kind="linear", name=args.model)
        blocks = token_blocks(tok, load_passages("shakespeare", "train"), 128, args.fit_blocks)
        log(f"fitted shortcuts: {fit_shortcuts(trained, blocks, layers)}")
        trained.config.training["corpus"] = "shakespeare"
        trained.save_exits(args.exits)
    else:
        trained = EarlyExitLM(lm, adapter_rank=args.adapter_rank, name=args.model)
        blocks = token_blocks(tok, load_passages("shakespeare", "train"), 128, args.train_steps * args.train_batch)
        train_exits(trained, blocks, ExitTrainConfig(layers=layers, steps=args.train_steps, batch_size=args.train_batch,
                                                     lr=args.lr, lora_rank=args.lora_rank, lora_lr=args.lora_lr), log=log)
        trained.config.training["corpus"] = "shakespeare"
        trained.save_exits(args.exits)
    added_parameters = trained.exit_parameters()  # LoRA included (counted before it is merged away)
    lora_merged = trained.merge_lora()  # a LoRA-adapted backbone decodes at the plain model's cost
    perplexity["with_exits"] = held_out_perplexity(trained, test_blocks)
    log(f"held-out perplexity {perplexity} (LoRA projections merged: {lora_merged})")

    # --- simulated, teacher-forced: the one simulator over each exit's logits and signals ------------------
    simulated = {}
    inputs = test_blocks[:, :-1]
    for name, model in (("shared", shared), ("trained", trained)):
        sweeps, rules = {}, []
        for rule, grid in (("maxprob", [i / 20 for i in range(1, 20)] + [0.97, 0.99]),
                           ("margin", [i / 20 for i in range(0, 20)] + [0.97, 0.99]),
                           ("saturation", [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995])):
            rules += [(rule, t, make_token_rule(rule, threshold=t, exit_layers=layers)) for t in grid]
        statics = [make_token_rule("static", min_layer=l, exit_layers=[l]) for l in layers]
        oracle = TokenRule(AgreementOracle(), exit_layers=layers, name="oracle-agreement")
        sims, full = simulate_tokens(model, inputs, [r for _, _, r in rules] + statics + [oracle], layers=layers)
        for (rule, t, _), sim in zip(rules, sims):
            sweeps.setdefault(rule, []).append(agreement_point(sim, full, t))
        per_layer = {l: agreement_point(sim, full, None)["agreement"] for l, sim in zip(layers, sims[len(rules):])}
        per_layer[L] = 1.0
        simulated[name] = {"per_layer_agreement": per_layer, "sweeps": sweeps,
                           "agreement_oracle_avg_layers": agreement_point(sims[-1], full, None)["avg_layers"],
                           "tokens": int(full.numel())}
        log(f"{name}: per-layer agreement {({k: round(v, 3) for k, v in per_layer.items()})}")
    targets = [float(v) for v in args.targets.split(",")]
    points = {}
    for target in targets:
        for rule, sweep in simulated["trained"]["sweeps"].items():
            ok = [s for s in sweep if s["agreement"] >= target]
            if ok:
                points[f"{rule}@{target}"] = {"rule": rule, "target": target,
                                              **min(ok, key=lambda s: s["avg_layers"])}
    log(f"operating points (simulated, trained exits): {points}")
    train_ids = token_blocks(tok, load_passages("shakespeare", "train"), 128, 400)
    vocab = frequent_tokens(train_ids, args.draft_vocab)
    coverage = float(torch.isin(test_blocks, vocab).float().mean())
    log(f"draft vocabulary: {len(vocab)} ids cover {coverage:.3f} of held-out tokens")

    # --- ConsistentEE policy on cached features, one per alpha; simulated on the held-out features ---------
    policy_blocks = token_blocks(tok, load_passages("shakespeare", "train"), 128, args.policy_blocks)
    feats = collect_features(trained, policy_blocks, layers)
    policies, sweep = {}, []
    for alpha in [float(a) for a in args.alphas.split(",")]:
        trained.policy = None
        t0 = time.perf_counter()
        history = train_policy(trained, feats, PolicyTrainConfig(alpha=alpha, epochs=args.policy_epochs, batch_size=256, lr=args.policy_lr), log=log)
        (policy_sim,), full = simulate_tokens(trained, inputs, [make_token_rule("policy", exit_layers=layers)],
                                              layers=layers)
        sim = agreement_point(policy_sim, full, 0.5)
        sweep.append({"alpha": alpha, "seconds": time.perf_counter() - t0, "final": history["history"][-1], **sim})
        policies[alpha] = {k: v.clone() for k, v in trained.policy.state_dict().items()}
        log(f"policy alpha={alpha}: simulated avg layers {sim['avg_layers']:.2f} agreement {sim['agreement']:.3f}")
    usable = [r for r in sweep if r["agreement"] >= targets[-1] and r["avg_layers"] < L]
    chosen = min(usable, key=lambda r: r["avg_layers"]) if usable else max(sweep, key=lambda r: r["agreement"])
    trained.policy.load_state_dict(policies[chosen["alpha"]])
    policy_info = {"sweep": sweep, "chosen_alpha": chosen["alpha"], "tokens": feats.info["tokens"],
                   "choice": f"fewest simulated layers with agreement >= {targets[-1]}, else the most agreeing"}

    # --- measured -----------------------------------------------------------------------------------------
    prompts = prompts_from(load_passages("shakespeare", "test"), tok, args.prompts, args.prompt_tokens)
    specs = [{"strategy": "hf", "name": "transformers generate"}]
    for E in ints(args.shared_draft_layers):
        specs.append({"strategy": "speculative", "draft_layers": E, "num_draft": args.num_draft, "exits": "shared",
                      "name": f"speculative E={E} shared head"})
    for E in ints(args.draft_layers):
        if args.plain_speculative:
            specs.append({"strategy": "speculative", "draft_layers": E, "num_draft": args.num_draft,
                          "exits": "trained", "name": f"speculative E={E} {args.exit_kind} exit"})
            specs.append({"strategy": "speculative", "draft_layers": E, "num_draft": args.num_draft,
                          "exits": "trained", "draft_vocab": True,
                          "name": f"speculative E={E} {args.exit_kind} exit, draft vocab {len(vocab)}"})
        specs.append({"strategy": "speculative", "draft_layers": E, "num_draft": args.num_draft, "exits": "trained",
                      "draft_vocab": True, "draft_threshold": args.draft_threshold,
                      "name": f"speculative E={E} {args.exit_kind} exit, draft vocab {len(vocab)}, stop below p={args.draft_threshold}"})
        if args.bonus_ablation:
            specs.append({**specs[-1], "bonus": False, "name": specs[-1]["name"] + ", no bonus token"})
    for key, point in points.items():
        if point["rule"] not in args.rules.split(","):
            continue
        for kv in (("propagate", "recompute") if point["target"] == targets[0] else ("propagate",)):
            specs.append({"strategy": "early-exit", "rule": point["rule"], "exits": "trained", "kv": kv,
                          "name": f"{point['rule']} τ={point['threshold']} (sim. agreement ≥{point['target']}) kv={kv}",
                          "params": {"threshold": point["threshold"], "exit_layers": layers}})
    for kv in ("propagate", "recompute"):
        specs.append({"strategy": "early-exit", "rule": "policy", "exits": "trained", "kv": kv,
                      "name": f"ConsistentEE policy (alpha={chosen['alpha']}) kv={kv}",
                      "params": {"threshold": 0.5, "exit_layers": layers}})
    specs.append({"strategy": "early-exit", "rule": "never", "exits": "trained", "name": "never exit (check)"})
    log(f"measuring {len(specs)} strategies on {len(prompts)} prompts")
    costs = micro_costs(trained, tok, vocab)
    log(f"micro costs (ms, fastest of 20): {costs}")
    payload = compare(trained, tok, prompts, specs, args.max_new_tokens, log=log,
                      models={"shared": shared, "trained": trained}, rounds=args.rounds, draft_vocab=vocab)
    payload["micro_costs_ms"] = costs
    payload["exit_parameters"] = added_parameters
    payload.update({
        "rounds": args.rounds, "command": "flock /tmp/layerexit-heavy.lock .venv/bin/python benchmarks/smollm2_generation.py " + shlex.join(sys.argv[1:]),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
                   f"threads, torch {torch.__version__}", "load_average_at_start": load_at_start,
        "date": started.isoformat(timespec="seconds"), "exits": args.exits, "layers": layers,
        "exit_kind": trained.config.adapter_kind, "exit_training": trained.config.training, "draft_vocab": {"size": len(vocab), "heldout_coverage": coverage}, "simulated": simulated, "operating_points": points,
        "policy": policy_info, "shared_head_exit_parameters": shared.exit_parameters(),
        "held_out_perplexity": perplexity, "lora_projections_merged": lora_merged,
    })
    write_json_atomic(args.output, payload)
    print(write_generation_report(payload, args.plots, "SmolLM2-135M generation"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluating generation strategies against the full model in the same run.

For every prompt the full model (our own decoder with a rule that never exits) runs first and gives the
reference greedy continuation; every strategy then runs on the same prompt right after it, so machine load
affects all of them alike. Reported per strategy: average exit layer per generated token, measured tokens
per second and its ratio to the full model's, agreement with the full greedy output as the position-wise
token match rate and ROUGE-L F1 over token ids. transformers' own ``generate`` can be timed beside them
(strategy ``hf``) to show our full-model loop is not a slow strawman.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..errors import bad_value
from ..evaluation.timing import timing_warnings
from .decode import Generation, generate
from .rules import make_token_rule
from .speculative import generate_speculative

STRATEGIES = ("full", "early-exit", "speculative", "hf")


def token_match(reference: list[int], output: list[int]) -> float:
    """Share of reference positions where the output has the same token (free-running, no re-alignment)."""
    if not reference:
        return 1.0
    return sum(1 for a, b in zip(reference, output) if a == b) / len(reference)


def rouge_l(reference: list[int], output: list[int]) -> float:
    """ROUGE-L F1 (Lin, 2004) over token ids: longest common subsequence, O(n·m)."""
    if not reference or not output:
        return float(reference == output)
    prev = [0] * (len(output) + 1)
    for a in reference:
        cur = [0]
        for j, b in enumerate(output):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(output), lcs / len(reference)
    return 2 * p * r / (p + r)


def spec_name(spec: dict) -> str:
    if spec.get("name"):
        return spec["name"]
    strategy = spec["strategy"]
    if strategy == "speculative":
        return f"speculative E={spec['draft_layers']} k={spec.get('num_draft', 4)}"
    if strategy == "early-exit":
        params = ",".join(f"{k}={v}" for k, v in spec.get("params", {}).items())
        return f"{spec['rule']}({params}) kv={spec.get('kv', 'propagate')}"
    return strategy


def run_spec(model, input_ids: torch.Tensor, spec: dict, max_new_tokens: int, eos_token_id: int | None = None,
             on_token: Callable[[int], None] | None = None, draft_vocab: torch.Tensor | None = None) -> Generation:
    """Run one strategy described by a dict (strategy, rule, params, kv, draft_layers, num_draft, and
    ``"draft_vocab": True`` to draft over ``draft_vocab``, (K,) token ids)."""
    strategy = spec.get("strategy", "full")
    if strategy not in STRATEGIES:
        raise bad_value("strategy", strategy, f"choose one of {', '.join(STRATEGIES)}")
    if strategy == "full":
        return generate(model, input_ids, None, max_new_tokens, eos_token_id=eos_token_id, on_token=on_token)
    if strategy == "early-exit":
        rule = make_token_rule(spec.get("rule", "maxprob"), **spec.get("params", {}))
        return generate(model, input_ids, rule, max_new_tokens, kv=spec.get("kv", "propagate"),
                        eos_token_id=eos_token_id, on_token=on_token)
    if strategy == "speculative":
        return generate_speculative(model, input_ids, spec.get("draft_layers", model.num_layers // 2),
                                    spec.get("num_draft", 4), max_new_tokens, eos_token_id, on_token,
                                    draft_vocab=_draft_vocab(spec, draft_vocab),
                                    draft_threshold=spec.get("draft_threshold"), bonus=spec.get("bonus", True))
    with torch.inference_mode():  # hf: transformers' own greedy generate, timed
        start = time.perf_counter()
        out = model.lm.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id or 0)
        seconds = time.perf_counter() - start
    tokens = out[0, input_ids.shape[1]:].tolist()
    return Generation(input_ids.shape[1], tokens, [model.num_layers] * len(tokens), model.num_layers, seconds)


def _draft_vocab(spec: dict, draft_vocab: torch.Tensor | None) -> torch.Tensor | None:
    if not spec.get("draft_vocab"):
        return None
    if draft_vocab is None:
        raise bad_value("draft_vocab", None, "a spec drafts over a restricted vocabulary: pass its token ids")
    return draft_vocab


def compare(model, tokenizer, prompts: list[str], specs: list[dict], max_new_tokens: int = 48,
            eos: bool = False, log: Callable[[str], None] | None = None, models: dict | None = None,
            rounds: int = 1, draft_vocab: torch.Tensor | None = None) -> dict:
    """Run the full model and every strategy on every prompt (interleaved); aggregate measured figures.

    ``models`` maps names to other exit sets on the same backbone; a spec picks one with ``"exits": name``.
    With ``rounds > 1`` every run is repeated (interleaved again) and its fastest time kept: on a shared
    machine the minimum is the least disturbed measurement (outputs are deterministic).
    """
    eos_id = tokenizer.eos_token_id if eos else None
    names = [spec_name(s) for s in specs]
    per = {n: {"tokens": 0, "seconds": 0.0, "match": [], "rouge": [], "exit_layers": [], "stats": []} for n in names}
    full = {"tokens": 0, "seconds": 0.0}
    samples = []
    if prompts:  # untimed warm-up of every path (first calls pay for allocations and lazy set-up)
        ids = tokenizer(prompts[0], return_tensors="pt").input_ids.to(next(model.parameters()).device)
        for spec in [{"strategy": "full"}] + specs:
            run_spec((models or {}).get(spec.get("exits"), model), ids, spec, min(4, max_new_tokens), eos_id,
                     draft_vocab=draft_vocab)
    for i, text in enumerate(prompts):
        ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
        best: dict[str, float] = {}
        outputs: dict[str, Generation] = {}
        for _ in range(max(1, int(rounds))):
            for name, spec in [("full", {"strategy": "full"})] + list(zip(names, specs)):
                runner = (models or {}).get(spec.get("exits"), model)
                out = run_spec(runner, ids, spec, max_new_tokens, eos_id, draft_vocab=draft_vocab)
                outputs.setdefault(name, out)
                best[name] = min(best.get(name, float("inf")), out.seconds)
        reference = outputs["full"]
        full["tokens"] += len(reference.tokens)
        full["seconds"] += best["full"]
        sample = {"prompt": text, "full": tokenizer.decode(reference.tokens)}
        for name, spec in zip(names, specs):
            out = outputs[name]
            row = per[name]
            row["tokens"] += len(out.tokens)
            row["seconds"] += best[name]
            row["match"].append(token_match(reference.tokens, out.tokens))
            row["rouge"].append(rouge_l(reference.tokens, out.tokens))
            row["exit_layers"] += out.exit_layers
            row["stats"].append(out.stats)
            sample[name] = tokenizer.decode(out.tokens)
        samples.append(sample)
        if log:
            log(f"prompt {i + 1}/{len(prompts)} done")
    full_tps = full["tokens"] / full["seconds"]
    results = []
    for name, spec in zip(names, specs):
        row = per[name]
        tps = row["tokens"] / row["seconds"]
        entry = {"name": name, "spec": spec, "tokens": row["tokens"], "seconds": row["seconds"],
                 "tokens_per_second": tps, "speedup_measured": tps / full_tps,
                 "token_match": sum(row["match"]) / len(row["match"]),
                 "rouge_l": sum(row["rouge"]) / len(row["rouge"]),
                 "identical_prompts": sum(1 for m in row["match"] if m == 1.0)}
        if row["exit_layers"] and spec.get("strategy") == "early-exit":
            layers = row["exit_layers"]
            entry["avg_layers"] = sum(layers) / len(layers)
            entry["speedup_ideal"] = model.num_layers / entry["avg_layers"]
            entry["exit_histogram"] = {str(l): layers.count(l) for l in sorted(set(layers))}
        if spec.get("strategy") == "speculative":
            drafted = sum(s["drafted"] for s in row["stats"])
            accepted = sum(s["accepted"] for s in row["stats"])
            entry["acceptance"] = accepted / drafted if drafted else 0.0
            entry["tokens_per_cycle"] = sum(s["tokens_per_cycle"] for s in row["stats"]) / len(row["stats"])
            entry["draft_vocab"] = row["stats"][0]["draft_vocab"]  # None: the whole vocabulary
        entry["warnings"] = timing_warnings(entry)  # a measured speed-up above the ideal L/avg_layers is noise
        results.append(entry)
    return {"num_layers": model.num_layers, "max_new_tokens": max_new_tokens, "prompts": len(prompts), "rounds": rounds,
            "full": {"tokens": full["tokens"], "seconds": full["seconds"], "tokens_per_second": full_tps},
            "results": results, "samples": samples,
            "exit_parameters": model.exit_parameters(), "backbone_parameters": model.backbone_parameters()}

"""Wall-clock measurement: the plain model, the full multi-exit path and early exit, in one process and run.

Three variants run over the same pre-tokenized batches, interleaved round by round so that machine noise
hits all of them alike; each variant's time is the median over rounds:

- ``plain``: the unmodified Hugging Face backbone forward plus the last exit's classifier (the model you
  would deploy without early exit; the reference for every speed-up);
- ``all_heads``: the engine with the ``full`` rule, every exit head computed (its excess over ``plain`` is
  the exit heads' overhead on the full path);
- ``early_exit``: the engine with the rule, rows leaving the batch as they exit.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..data import Encoded, model_inputs
from ..model import MultiExitModel
from ..rules import ExitRule, Full


@dataclass
class Batches:
    """Pre-padded batches in data order, so tokenization and padding stay outside the timed region."""

    inputs: list[dict[str, torch.Tensor]]
    labels: torch.Tensor

    @classmethod
    def build(cls, encoded: Encoded, batch_size: int, limit: int | None = None) -> "Batches":
        n = len(encoded) if limit is None else min(limit, len(encoded))
        inputs = []
        for start in range(0, n, batch_size):
            batch = encoded.collate([encoded[i] for i in range(start, min(start + batch_size, n))])
            inputs.append(model_inputs(batch))
        return cls(inputs, torch.tensor(encoded.labels[:n]))


@torch.inference_mode()
def _plain(model: MultiExitModel, inputs: dict) -> torch.Tensor:
    """The unmodified backbone's forward, then the last exit on its output (no other exit computed)."""
    out = model.backbone(**inputs)
    hidden = out.last_hidden_state  # (B, T, H)
    kind = model.config.exit_feature
    if kind == "mean":
        mask = inputs["attention_mask"].to(hidden.dtype)
        feature = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    elif kind == "cls":
        feature = hidden[:, 0]
    else:
        feature = out.pooler_output
    return model.exits[-1](feature)


def _engine(model: MultiExitModel, inputs: dict, rule: ExitRule):
    return model.early_exit(**inputs, rule=rule)


def _timed(fn) -> tuple[float, object]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CUDA runs asynchronously
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def measure(
    model: MultiExitModel,
    batches: Batches,
    rules: dict[str, ExitRule],
    rounds: int = 3,
    warmup: int = 1,
) -> dict:
    """Time ``plain``, ``all_heads`` and every rule over ``batches``; returns seconds and engine outputs."""
    model.eval()
    variants = {"plain": lambda b: _plain(model, b), "all_heads": lambda b: _engine(model, b, Full())}
    variants.update({name: (lambda b, r=rule: _engine(model, b, r)) for name, rule in rules.items()})
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, list] = {}
    for round_index in range(warmup + rounds):
        for name, fn in variants.items():
            seconds = 0.0
            results = []
            for inputs in batches.inputs:
                elapsed, result = _timed(lambda: fn(inputs))
                seconds += elapsed
                results.append(result)
            if round_index >= warmup:
                times[name].append(seconds)
            outputs[name] = results
    summary = {name: statistics.median(values) for name, values in times.items()}
    engine_outputs = {}
    for name in rules:
        exit_layer = torch.cat([r.exit_layer for r in outputs[name]])
        predictions = torch.cat([r.predictions for r in outputs[name]])
        engine_outputs[name] = (exit_layer, predictions)
    return {"seconds": summary, "rounds": {k: v for k, v in times.items()}, "outputs": engine_outputs}


def speed_report(model: MultiExitModel, encoded: Encoded, rules: dict[str, ExitRule], batch_size: int,
                 limit: int | None = None, rounds: int = 3) -> list[dict]:
    """One entry per rule: accuracy, avg layers, measured and ideal speed-up, their ratio, head overhead."""
    batches = Batches.build(encoded, batch_size, limit)
    device = next(model.parameters()).device
    batches.inputs = [{k: v.to(device) for k, v in inputs.items()} for inputs in batches.inputs]
    result = measure(model, batches, rules, rounds=rounds)
    seconds = result["seconds"]
    num_layers = model.config.num_layers
    entries = []
    for name, rule in rules.items():
        exit_layer, predictions = result["outputs"][name]
        avg_layers = float(exit_layer.double().mean())
        measured = seconds["plain"] / seconds[name]
        ideal = num_layers / avg_layers
        entries.append({
            "rule": rule.name, "params": rule.params, "batch_size": batch_size,
            "accuracy": float((predictions == batches.labels).double().mean()),
            "avg_layers": avg_layers,
            "speedup_measured": measured, "speedup_ideal": ideal, "ratio_to_ideal": measured / ideal,
            "overhead_heads": seconds["all_heads"] / seconds["plain"] - 1.0,
            "seconds_plain": seconds["plain"], "seconds_all_heads": seconds["all_heads"],
            "seconds_early_exit": seconds[name], "num_examples": len(batches.labels), "rounds": rounds,
            "exit_layers": exit_layer.tolist(),
        })
    return entries

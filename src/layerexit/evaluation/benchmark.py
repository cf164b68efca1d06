"""Wall-clock measurement: the plain model, the full multi-exit path and early exit, in one process and run.

Three variants run over the same pre-tokenized batches, interleaved round by round so that machine noise
hits all of them alike; each variant's time is the median over rounds, and the per-round speed-ups give the
spread (see ``layerexit.evaluation.timing`` for the plausibility checks):

- ``plain``: the unmodified Hugging Face backbone forward plus the last exit's classifier (the model you
  would deploy without early exit; the reference for every speed-up);
- ``all_heads``: the engine with the ``full`` rule, every exit head computed (its excess over ``plain`` is
  the exit heads' overhead on the full path);
- ``early_exit``: the engine with the rule, rows leaving the batch as they exit.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..catalog import DEFAULT_ROUNDS
from ..data import Encoded, model_inputs
from ..model import MultiExitModel
from ..rules import ExitRule, Full
from .cache import LogitCache
from .simulate import simulate
from .timing import spread, timing_warnings


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
def plain_forward(model: MultiExitModel, inputs: dict) -> torch.Tensor:
    """The model a user would deploy without early exit: the unmodified Hugging Face backbone's forward, then
    the last exit on its output, no other exit computed. (B, C) logits, equal to ``model(**inputs)[-1]``
    (tested); the denominator of every measured speed-up.

    The feature is taken from the backbone's own output rather than through ``model.exit_feature`` so that
    the timed path is exactly the stock forward (whose last hidden state already holds a pre-norm model's
    final norm). On another layer backend (bf16, int8, ONNX Runtime) the reference is that backend's full
    model instead: every layer through the backend, then the last exit, so the speed-up isolates exiting.
    """
    if model.backend.name != "eager":  # another layer backend: that backend's full model is the reference
        with model.backend.host():  # the same host threading as the engine
            state = model.run_layers(model.start(**inputs), 0, model.config.num_layers)
            return model.exits[-1](model.exit_feature(state))
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


def engine_forward(model: MultiExitModel, inputs: dict, rule: ExitRule):
    """The early-exit engine on one batch (what every early-exit time measures)."""
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
    rounds: int = DEFAULT_ROUNDS,
    warmup: int = 1,
    progress: bool = True,
) -> dict:
    """Time ``plain``, ``all_heads`` and every rule over ``batches``, interleaved round by round.

    Returns ``seconds`` (median per variant), ``rounds`` (every round's seconds per variant) and ``outputs``
    (each rule's exit layers and predictions). ``progress`` shows a progress bar on stderr (updated outside
    the timed calls).
    """
    model.eval()
    variants = {"plain": lambda b: plain_forward(model, b), "all_heads": lambda b: engine_forward(model, b, Full())}
    variants.update({name: (lambda b, r=rule: engine_forward(model, b, r)) for name, rule in rules.items()})
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, list] = {}
    total = (warmup + rounds) * len(variants) * len(batches.inputs)
    with tqdm(total=total, desc=f"timing {len(batches.labels)} rows", unit="batch", disable=not progress,
              leave=False) as bar:
        for round_index in range(warmup + rounds):
            for name, fn in variants.items():
                seconds = 0.0
                results = []
                for inputs in batches.inputs:
                    elapsed, result = _timed(lambda: fn(inputs))
                    seconds += elapsed
                    results.append(result)
                    bar.update()
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
                 limit: int | None = None, rounds: int = DEFAULT_ROUNDS, progress: bool = True) -> list[dict]:
    """One entry per rule: accuracy, avg layers, measured and ideal speed-up, their ratio, head overhead,
    the spread of the per-round speed-up and overhead, the machine's load, and ``warnings`` where the timing
    is implausible (see ``layerexit.evaluation.timing``)."""
    batches = Batches.build(encoded, batch_size, limit)
    device = next(model.parameters()).device
    batches.inputs = [{k: v.to(device) for k, v in inputs.items()} for inputs in batches.inputs]
    result = measure(model, batches, rules, rounds=rounds, progress=progress)
    seconds, per_round = result["seconds"], result["rounds"]
    overhead_rounds = [h / p - 1.0 for h, p in zip(per_round["all_heads"], per_round["plain"])]
    num_layers = model.config.num_layers
    entries = []
    for name, rule in rules.items():
        exit_layer, predictions = result["outputs"][name]
        avg_layers = float(exit_layer.double().mean())
        measured = seconds["plain"] / seconds[name]
        ideal = num_layers / avg_layers
        entry = {
            "rule": rule.name, "params": rule.params, "batch_size": batch_size, "backend": model.backend.name,
            "accuracy": float((predictions == batches.labels).double().mean()),
            "avg_layers": avg_layers,
            "speedup_measured": measured, "speedup_ideal": ideal, "ratio_to_ideal": measured / ideal,
            "speedup_spread": spread([p / e for p, e in zip(per_round["plain"], per_round[name])]),
            "overhead_heads": seconds["all_heads"] / seconds["plain"] - 1.0,
            "overhead_spread": spread(overhead_rounds),
            "seconds_plain": seconds["plain"], "seconds_all_heads": seconds["all_heads"],
            "seconds_early_exit": seconds[name], "num_examples": len(batches.labels), "rounds": rounds,
            "load_average": round(os.getloadavg()[0], 2),
            "exit_layers": exit_layer.tolist(),
        }
        entry["warnings"] = timing_warnings(entry)
        entries.append(entry)
    return entries


def compare_with_simulation(entries: list[dict], cache: LogitCache, rules: dict[str, ExitRule]) -> list[dict]:
    """Set beside each measured entry (from ``speed_report``) the simulation of the same rule over the same
    rows of ``cache`` (the first ``num_examples`` rows, in data order, as ``Batches`` takes them).

    Adds ``matches_simulation`` (share of rows the engine exited where the simulation did),
    ``simulated_accuracy`` and ``simulated_avg_layers``; drops the per-row ``exit_layers``. ``rules`` maps
    an entry's ``rule`` name to the rule that was timed (fitted rules cannot be rebuilt from their params).
    """
    for entry in entries:
        exit_layers = torch.tensor(entry.pop("exit_layers"))
        n = len(exit_layers)
        signals = {k: v[:, :n] for k, v in cache.signals.items()}
        simulated = simulate(rules[entry["rule"]], cache.logits[:, :n], signals=signals)
        point = simulated.point(cache.labels[:n], cache.num_layers, {})
        entry["matches_simulation"] = float((simulated.exit_layer == exit_layers).double().mean())
        entry["simulated_accuracy"] = point["accuracy"]
        entry["simulated_avg_layers"] = point["avg_layers"]
    return entries

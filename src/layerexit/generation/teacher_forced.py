"""Teacher-forced per-layer outputs of token positions, replayed by the one simulator.

The decoder's counterpart of :func:`layerexit.evaluation.cache.collect_logits`: a plain forward of given
sequences (no KV cache) gives, for every position, each exit's next-token logits and the signals token rules
read (``similarity``, ``policy``, ``position``), computed by the same functions the decoder calls
(:meth:`EarlyExitLM.exit_logits`, :func:`~layerexit.generation.rules.token_signals`).
:func:`layerexit.evaluation.simulate.simulate` replays any :class:`~layerexit.generation.rules.TokenRule` over
them; for a sequence the decoder generated with deferred recomputation, the simulated exits and tokens are the
decoder's own (``tests/test_conformance.py``). On other text the replay is simulated: each position sees the
text's real prefix through every layer, where a decoder would see the KV cache of its earlier exits.

A (layers, tokens, vocabulary) cache of a 49k-token vocabulary does not fit in memory, so positions come in
batches of a few sequences, and a batch holds only the exits asked for (the last layer always): rules are
row-wise, so simulating batch by batch gives what one simulation over all positions would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..errors import bad_value
from ..evaluation.simulate import Simulation, simulate
from ..rules import ExitRule
from .rules import token_signals

#: the signals a token rule may read besides the logits
TOKEN_SIGNALS = ("similarity", "policy", "position")


@dataclass
class TokenBatch:
    """Teacher-forced outputs of n token positions at C exits.

    logits (C, n, V) of exits ``layers`` (1-based, increasing, the last is the model's last layer); signals
    {name: (C, n)}; full (n,) the full model's greedy next token at each position; hidden (C, n, H) the hidden
    states after those layers.
    """

    logits: torch.Tensor
    layers: list[int]
    signals: dict[str, torch.Tensor]
    full: torch.Tensor
    hidden: torch.Tensor


def exit_layers(model, layers: Sequence[int] | None) -> list[int]:
    """The exits a cache keeps: ``layers`` (1-based; None: every layer) and always the last."""
    L = model.num_layers
    chosen = sorted({int(v) for v in layers}) if layers else list(range(1, L + 1))
    bad = [v for v in chosen if not 1 <= v <= L]
    if bad:
        raise bad_value("layers", bad, f"exit layers are 1..{L}")
    return [v for v in chosen if v < L] + [L]


@torch.no_grad()
def token_batches(model, ids: torch.Tensor, first: int = 0, layers: Sequence[int] | None = None,
                  batch_size: int = 2) -> Iterator[TokenBatch]:
    """(B, T) token ids -> batches of the positions ``first..T-1`` of ``batch_size`` sequences each.

    ``position`` counts a row's place among them from 1, as the decoder counts the tokens a rule decides (the
    prompt's own next token, number 0, always runs the full model): with ``first`` = the prompt length it is
    exactly the generated position. ``policy`` is present when the model has a token policy.
    """
    if ids.dim() != 2 or not 0 <= first < ids.shape[1]:
        raise bad_value("first", first, f"give (B, T) ids and a first position in 0..{ids.shape[1] - 1}")
    layers = exit_layers(model, layers)
    needs = [name for name in TOKEN_SIGNALS[:-1] if name != "policy" or model.policy is not None]
    modes = {module: module.training for module in model.modules()}  # restored as they were, module by module
    model.eval()
    try:
        yield from _batches(model, ids, first, layers, needs, batch_size)
    finally:
        for module, mode in modes.items():
            module.train(mode)


def _batches(model, ids, first, layers, needs, batch_size) -> Iterator[TokenBatch]:
    positions = torch.arange(1, ids.shape[1] - first + 1)
    for start in range(0, ids.shape[0], batch_size):
        seqs = ids[start:start + batch_size]
        hidden = model.all_hidden(seqs)  # (L, b, T, H)
        embedded = model.adapter.embed(seqs, torch.arange(seqs.shape[1], device=seqs.device))  # (b, T, H)
        hidden, embedded = hidden[:, :, first:].flatten(1, 2), embedded[:, first:].flatten(0, 1)  # (L, n, H), (n, H)
        logits, signals = [], {name: [] for name in needs}
        for layer in layers:
            logits.append(model.exit_logits(layer, hidden[layer - 1]))  # (n, V)
            before = hidden[layer - 2] if layer > 1 else embedded
            for name, value in token_signals(model, needs, layer, hidden[layer - 1], before).items():
                signals[name].append(value)
        stacked = {name: torch.stack(values) for name, values in signals.items()}  # (C, n) each
        stacked["position"] = positions.repeat(seqs.shape[0]).expand(len(layers), -1)
        logits = torch.stack(logits)  # (C, n, V)
        yield TokenBatch(logits, layers, stacked, logits[-1].argmax(-1), hidden[[layer - 1 for layer in layers]])


def simulate_tokens(model, ids: torch.Tensor, rules: Sequence[ExitRule], first: int = 0,
                    layers: Sequence[int] | None = None, batch_size: int = 2) -> tuple[list[Simulation], torch.Tensor]:
    """Replay every rule over the teacher-forced positions ``first..T-1`` of (B, T) ``ids`` with
    :func:`~layerexit.evaluation.simulate.simulate`, batch by batch: one :class:`Simulation` per rule over all
    positions, and the full model's tokens (N,), the targets of the agreement oracle and of agreement.

    ``layers``: the exits to keep (default every layer); each rule must exit only there (a token rule's
    ``exit_layers``). Give token rules their horizon (``with_horizon``) for CALM's decay.
    """
    exits, predictions, full = [[] for _ in rules], [[] for _ in rules], []
    for batch in token_batches(model, ids, first, layers, batch_size):
        full.append(batch.full)
        for i, rule in enumerate(rules):
            sim = simulate(rule, batch.logits, batch.full if rule.needs_targets else None, batch.signals, batch.layers)
            exits[i].append(sim.exit_layer)
            predictions[i].append(sim.predictions)
    sims = [Simulation(torch.cat(e), torch.cat(p)) for e, p in zip(exits, predictions)]
    return sims, torch.cat(full)
